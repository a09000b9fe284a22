"""A site's PACS over DICOMweb: pull a cohort's studies (QIDO-RS, WADO-RS) into the site's local store,
and store objects back (STOW-RS). Built on the ``dicomweb-client`` package.

Pulled instances land in ``WS/pacs/store/<study>/<series>/<sop>.dcm`` and are then cataloged by the
same folder ingest as any DICOM folder (same validation, same reasons). A study's new instances are
downloaded into ``WS/pacs/partial/<study>/`` first and moved into the store only when every one of
them arrived and is the instance that was asked for; a study that fails half-way leaves nothing in
the store and is reported with its reason, so a half-downloaded study is never cataloged. A series that
is new as a whole comes in one WADO-RS series request, streamed to disk instance by instance; only a
series partly here already is asked for instance by instance. Re-running asks the PACS what each study
holds and fetches only the instances not in the store yet. Network errors and 5xx answers are retried
with exponential back-off (a series from its start).

Credentials come from the environment (``ONCOFED_PACS_USER`` and ``ONCOFED_PACS_PASSWORD``, or
``ONCOFED_PACS_TOKEN``) or from a file only the site user can read, never from the command line or
the URL, and are never printed or logged.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial as partial_call
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pydicom

STORE = Path("pacs") / "store"
PARTIAL = Path("pacs") / "partial"
ENV_USER, ENV_PASSWORD, ENV_TOKEN = "ONCOFED_PACS_USER", "ONCOFED_PACS_PASSWORD", "ONCOFED_PACS_TOKEN"
UID_TAGS = {"study": "0020000D", "series": "0020000E", "sop": "00080018"}
# Study-level QIDO matches these; "Modality" is a series attribute, asked as ModalitiesInStudy.
STUDY_KEYS = {"Modality": "ModalitiesInStudy"}
# The study-level matching keys a PACS must support (PS3.18 QIDO-RS, Study): a key outside them may be ignored
# by the PACS, which would then answer with every study it holds.
STUDY_QUERY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                    "PatientName", "PatientID", "StudyInstanceUID", "StudyID", "StudyDescription")


class DicomWebError(Exception):
    """The PACS cannot be reached or refused, or bad credentials/query; the message says what to do."""


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to the PACS. ``repr`` never shows the secret."""

    kind: str  # "none", "basic" or "bearer"
    user: str = ""
    secret: str = field(default="", repr=False)
    source: str = ""  # where they came from, for messages

    def apply(self, session: Any) -> None:
        """Set them on a ``requests`` session."""
        if self.kind == "basic":
            session.auth = (self.user, self.secret)
        elif self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.secret}"


def credentials_from(env: Mapping[str, str], file: Path | None = None) -> Credentials:
    """The PACS credentials: from ``file`` if given, else from the environment, else none.

    The file holds one line, ``user:password`` or ``Bearer TOKEN``, and must be a regular file owned
    by this user and readable by nobody else (``chmod 600``), like an SSH key.

    Raises:
        DicomWebError: The file is missing, readable by others, or malformed; or the environment
            holds a user without a password.
    """
    if file is not None:
        try:
            st = file.stat()
        except OSError:
            raise DicomWebError(f"credentials file {file} does not exist: write 'user:password' or "
                                "'Bearer TOKEN' into it and run chmod 600 on it") from None
        if not stat.S_ISREG(st.st_mode):
            raise DicomWebError(f"credentials file {file} is not a regular file")
        if st.st_mode & 0o077 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise DicomWebError(f"credentials file {file} can be read by other users (mode "
                                f"{stat.S_IMODE(st.st_mode):o}): run chmod 600 {file} as the site user")
        lines = [ln.strip() for ln in file.read_text().splitlines() if ln.strip()]
        if len(lines) != 1:
            raise DicomWebError(f"credentials file {file}: expected one line, 'user:password' or 'Bearer TOKEN'")
        line = lines[0]
        if line.lower().startswith("bearer "):
            return Credentials("bearer", secret=line[7:].strip(), source=str(file))
        user, sep, password = line.partition(":")
        if not sep or not user:
            raise DicomWebError(f"credentials file {file}: expected 'user:password' or 'Bearer TOKEN'")
        return Credentials("basic", user=user, secret=password, source=str(file))
    if env.get(ENV_TOKEN):
        return Credentials("bearer", secret=env[ENV_TOKEN], source=ENV_TOKEN)
    if env.get(ENV_USER):
        if ENV_PASSWORD not in env:
            raise DicomWebError(f"{ENV_USER} is set but {ENV_PASSWORD} is not: set both, or use a credentials file")
        return Credentials("basic", user=env[ENV_USER], secret=env[ENV_PASSWORD], source=ENV_USER)
    return Credentials("none")


def check_url(url: str) -> str:
    """A DICOMweb base URL (``http(s)://host[:port]/path``), without credentials in it.

    Raises:
        DicomWebError: Not http(s), or user:password in the URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomWebError(f"--dicomweb {url!r}: give the PACS's DICOMweb base URL, e.g. "
                            "https://pacs.hospital.local/dicom-web")
    if parts.username or parts.password:
        raise DicomWebError("put no credentials in the DICOMweb URL (they would end up in the shell history and "
                            f"logs): use {ENV_USER}/{ENV_PASSWORD}, {ENV_TOKEN} or --credentials FILE")
    return url.rstrip("/")


def make_client(url: str, credentials: Credentials, *, session: Any = None, timeout: float = 60.0) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with the credentials applied."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = session or requests.Session()
    credentials.apply(session)
    client = DICOMwebClient(check_url(url), session=session, timeout=timeout)
    # Its own retrying retries every exception, a refused connection included, for about 30 s per request:
    # :func:`with_retries` is the one retry loop, with our counts and back-off.
    client.set_http_retry_params(retry=False)
    return client


def _value(record: Mapping[str, Any], tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _explain(exc: BaseException, url: str) -> str:
    """A one-line reason for a failed request, with what to do."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            return (f"the PACS refused the credentials (HTTP {code}): check {ENV_USER}/{ENV_PASSWORD}, "
                    f"{ENV_TOKEN} or the credentials file")
        if code == 404:
            return f"not found on the PACS (HTTP 404) at {url}"
        return f"the PACS answered HTTP {code}"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {url}: check the address and that the PACS's DICOMweb service is up"
    if isinstance(exc, requests.Timeout):
        return f"no answer from {url} in time"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _retryable(exc: BaseException) -> bool:
    import requests

    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and (exc.response.status_code >= 500 or exc.response.status_code == 429)
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


def with_retries(call: Callable[[], Any], *, retries: int, backoff: float,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[Any, int]:
    """``call()``, retried on network errors, 5xx and 429 answers ``retries`` times with back-off
    ``backoff · 2^k`` seconds; returns the result and the attempts it took. Other errors are raised at once."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return call(), attempt
        except Exception as exc:  # noqa: BLE001 - re-raised unless retryable
            if attempt > retries or not _retryable(exc):
                raise
            sleep(backoff * 2 ** (attempt - 1))


def parse_query(query: str) -> dict[str, str]:
    """``"Modality=CT&StudyDate=20200101-20201231"`` as study-level QIDO filters.

    Raises:
        DicomWebError: A part is not ``key=value``.
    """
    filters: dict[str, str] = {}
    for part in [p for p in query.split("&") if p.strip()]:
        if "=" not in part:
            raise DicomWebError(f"--query part {part!r}: expected KEY=VALUE pairs joined by '&', "
                                "e.g. Modality=CT&StudyDate=20200101-20201231")
    for key, value in parse_qsl(query, keep_blank_values=True):
        name = STUDY_KEYS.get(key.strip(), key.strip())
        if name not in STUDY_QUERY_KEYS:
            import difflib

            close = difflib.get_close_matches(key.strip(), [*STUDY_KEYS, *STUDY_QUERY_KEYS], n=1)
            raise DicomWebError(f"--query key {key.strip()!r} is not a study search key"
                                + (f"; did you mean {close[0]!r}?" if close else "")
                                + f" (a PACS may ignore an unknown key and return every study it holds). Keys: "
                                f"Modality, {', '.join(STUDY_QUERY_KEYS)}")
        if not value.strip():
            raise DicomWebError(f"--query key {key.strip()!r} has no value: give one or leave the key out")
        filters[name] = value.strip()
    return filters


def probe(client: Any, *, retries: int = 1, backoff: float = 1.0) -> None:
    """One small QIDO-RS query, so a wrong address or refused credentials are one clear error up front.

    Raises:
        DicomWebError: The PACS cannot be reached or refuses.
    """
    try:
        with_retries(lambda: client.search_for_studies(limit=1), retries=retries, backoff=backoff)
    except Exception as exc:  # noqa: BLE001 - every failure gets one line
        raise DicomWebError(_explain(exc, client.base_url)) from None


PAGE = 500


def search_all(search: Callable[..., list[dict[str, Any]]], key: str, *, retries: int, backoff: float,
               sleep: Callable[[float], None] = time.sleep, **kwargs: Any) -> tuple[list[dict[str, Any]], int]:
    """Every record of a QIDO-RS search, page by page (``limit``/``offset``), once per ``key`` tag value.

    Stops at a short page or at a page with nothing new: some servers ignore ``offset`` and send the
    first page again (dicomweb-client's own ``get_remaining`` then never ends).
    """
    seen: dict[str, dict[str, Any]] = {}
    attempts = 0
    offset = 0
    while True:
        page, n = with_retries(partial_call(search, limit=PAGE, offset=offset, **kwargs), retries=retries,
                               backoff=backoff, sleep=sleep)
        attempts += n
        new = 0
        for record in page or []:
            uid = _value(record, key)
            if uid and uid not in seen:
                seen[uid] = record
                new += 1
        if len(page or []) < PAGE or new == 0:
            return list(seen.values()), attempts
        offset += len(page)


def find_studies(client: Any, *, studies: Sequence[str] = (), query: str | None = None, retries: int = 3,
                 backoff: float = 1.0) -> list[str]:
    """The StudyInstanceUIDs to pull: those given, and those the query finds (QIDO-RS), in order, once each.

    Raises:
        DicomWebError: The PACS cannot be queried (the message says why).
    """
    found = list(dict.fromkeys(studies))
    if query is not None:
        filters = parse_query(query)
        try:
            records, _ = search_all(client.search_for_studies, UID_TAGS["study"], retries=retries, backoff=backoff,
                                    search_filters=filters)
        except Exception as exc:  # noqa: BLE001 - every failure gets one line
            raise DicomWebError(f"QIDO-RS study query failed: {_explain(exc, client.base_url)}") from None
        for record in records:
            uid = _value(record, UID_TAGS["study"])
            if uid and uid not in found:
                found.append(uid)
    return found


@dataclass
class StudyFetch:
    """What happened to one study."""

    study_uid: str
    status: str = "pending"  # fetched, up-to-date, failed
    instances: int = 0  # on the PACS
    fetched: int = 0  # new this run
    attempts: int = 0  # requests made, retries included
    seconds: float = 0.0
    reason: str = ""


def local_instances(store: Path, study_uid: str) -> set[str]:
    """SOPInstanceUIDs of a study already in the local store (file names are the UIDs)."""
    folder = store / study_uid
    return {p.stem for p in folder.rglob("*.dcm")} if folder.is_dir() else set()


def fetch_study(client: Any, workspace: Path, study_uid: str, *, retries: int = 3, backoff: float = 1.0,
                sleep: Callable[[float], None] = time.sleep) -> StudyFetch:
    """Bring one study's new instances into the local store, all of them or none.

    Never raises for a PACS or network failure: the result says ``failed`` with the reason.
    """
    t0 = time.perf_counter()
    result = StudyFetch(study_uid)
    store, partial = workspace / STORE, workspace / PARTIAL / study_uid
    url = getattr(client, "base_url", "the PACS")
    try:
        records, attempts = search_all(client.search_for_instances, UID_TAGS["sop"], retries=retries,
                                       backoff=backoff, sleep=sleep, study_instance_uid=study_uid)
        result.attempts += attempts
        wanted = [(_value(r, UID_TAGS["series"]), _value(r, UID_TAGS["sop"])) for r in records]
        wanted = [(series, sop) for series, sop in wanted if series and sop]
        result.instances = len(wanted)
        if not wanted:
            result.status, result.reason = "failed", "the PACS lists no instances of this study; check the UID"
            return result
        have = local_instances(store, study_uid)
        missing = [(series, sop) for series, sop in wanted if sop not in have]
        if not missing:
            result.status = "up-to-date"
            return result
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        listed: dict[str, set[str]] = {}
        for series, sop in wanted:
            listed.setdefault(series, set()).add(sop)
        needed: dict[str, set[str]] = {}
        for series, sop in missing:
            needed.setdefault(series, set()).add(sop)
        for series, sops in needed.items():
            if sops == listed[series]:
                # A whole series is new: one WADO-RS series request, streamed to disk instance by instance.
                _, attempts = with_retries(partial_call(_save_series, client, study_uid, series, sops, partial),
                                           retries=retries, backoff=backoff, sleep=sleep)
                result.attempts += attempts
                continue
            for sop in sorted(sops):  # a few instances of a series already here: only those are asked for
                ds, attempts = with_retries(
                    partial_call(client.retrieve_instance, study_uid, series, sop,
                                 media_types=(("application/dicom", "*"),)),
                    retries=retries, backoff=backoff, sleep=sleep)
                result.attempts += attempts
                _save_instance(ds, study_uid, sop, partial / series)
        # Complete: move the study's new files into the store (renames within one file system).
        for file in sorted(partial.rglob("*.dcm")):
            final = store / study_uid / file.relative_to(partial)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, final)
        result.status, result.fetched = "fetched", len(missing)
    except DicomWebError as exc:
        result.status, result.reason = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - one study's failure never stops the others
        result.status, result.reason = "failed", _explain(exc, url)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        result.seconds = time.perf_counter() - t0
    return result


def _save_instance(ds: Any, study_uid: str, sop: str, folder: Path) -> None:
    """Write one retrieved instance, if it is the one asked for."""
    if str(ds.get("SOPInstanceUID", "")) != sop or str(ds.get("StudyInstanceUID", "")) != study_uid:
        raise DicomWebError(f"the PACS sent another instance ({ds.get('SOPInstanceUID', '?')}) for {sop}")
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{sop}.dcm", enforce_file_format=False)


def _save_series(client: Any, study_uid: str, series: str, sops: set[str], partial: Path) -> None:
    """Retrieve a whole series (WADO-RS), writing each instance as it arrives; raise unless exactly the listed
    instances came (a retry starts the series again)."""
    folder = partial / series
    shutil.rmtree(folder, ignore_errors=True)
    got: set[str] = set()
    for ds in client.iter_series(study_uid, series, media_types=(("application/dicom", "*"),)):
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop not in sops:
            raise DicomWebError(f"the PACS sent an instance ({sop or '?'}) that series {series} does not list")
        _save_instance(ds, study_uid, sop, folder)
        got.add(sop)
    if got != sops:
        raise DicomWebError(f"series {series}: the PACS sent {len(got)} of its {len(sops)} instances")


def fetch_studies(client: Any, workspace: Path, studies: Sequence[str], *, retries: int = 3, backoff: float = 1.0,
                  on_study: Callable[[int, int, StudyFetch], None] | None = None) -> list[StudyFetch]:
    """:func:`fetch_study` for each study; ``on_study(done, total, result)`` after each."""
    out = []
    for i, uid in enumerate(studies, start=1):
        out.append(fetch_study(client, workspace, uid, retries=retries, backoff=backoff))
        if on_study is not None:
            on_study(i, len(studies), out[-1])
    return out


def store_files(client: Any, paths: Sequence[Path], *, retries: int = 3,
                backoff: float = 1.0) -> list[tuple[str, str, str, str]]:
    """STOW-RS the DICOM files, one request per study; return ``(sop, study, series, file)`` of each object
    the PACS accepted.

    Raises:
        DicomWebError: The PACS refused or failed (the message names the study and why).
    """
    by_study: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in paths:
        ds: pydicom.Dataset = pydicom.dcmread(path)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append((path, ds))
    accepted: list[tuple[str, str, str, str]] = []
    for study, items in by_study.items():
        try:
            answer, _ = with_retries(partial_call(client.store_instances, [ds for _, ds in items],
                                                  study_instance_uid=study), retries=retries, backoff=backoff)
        except Exception as exc:  # noqa: BLE001 - one line with the study
            raise DicomWebError(f"STOW-RS of study {study} failed: {_explain(exc, client.base_url)}") from None
        failed = answer.get("FailedSOPSequence", []) if answer is not None else []
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise DicomWebError(f"the PACS refused {len(failed)} object(s) of study {study} (failure reasons "
                                f"{reasons})")
        ok = {str(item.ReferencedSOPInstanceUID)
              for item in (answer.get("ReferencedSOPSequence", []) if answer is not None else [])}
        for path, ds in items:
            if str(ds.SOPInstanceUID) in ok:
                accepted.append((str(ds.SOPInstanceUID), study, str(ds.SeriesInstanceUID), str(path)))
    return accepted
