"""A site's PACS over DICOMweb: :class:`DicomWebPacs` searches it (QIDO-RS), retrieves series and instances
from it (WADO-RS) and stores objects to it (STOW-RS), as :class:`imaging.pacs.PacsSource` and
:class:`imaging.pacs.PacsStore` ask. Built on the ``dicomweb-client`` package.

What the site does with it (a cohort pulled into the workspace all of a study or none, re-runs that fetch
only what is new, retries with back-off, the site catalog's records) is :mod:`fl_client.pacs_transfer`,
the same for any protocol. Each method here makes one request (or one paged search) and turns any
failure into a :class:`DicomWebError` that says what to do, marked transient for network errors and 5xx
or 429 answers. A whole series comes in one WADO-RS series request, streamed to disk instance by instance.

Credentials come from the environment (``ONCOFED_PACS_USER`` and ``ONCOFED_PACS_PASSWORD``, or
``ONCOFED_PACS_TOKEN``) or from a file only the site user can read, never from the command line or
the URL, and are never printed or logged.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pydicom

from imaging.pacs import Instance, PacsError, StoredObject

__all__ = [
    "ENV_PASSWORD",
    "ENV_TOKEN",
    "ENV_USER",
    "Credentials",
    "DicomWebError",
    "DicomWebPacs",
    "check_url",
    "credentials_from",
    "make_client",
    "search_all",
]

ENV_USER, ENV_PASSWORD, ENV_TOKEN = "ONCOFED_PACS_USER", "ONCOFED_PACS_PASSWORD", "ONCOFED_PACS_TOKEN"
UID_TAGS = MappingProxyType({"study": "0020000D", "series": "0020000E", "sop": "00080018"})
MEDIA_TYPES = (("application/dicom", "*"),)  # each instance in the transfer syntax the PACS holds it in
T = TypeVar("T")


class DicomWebError(PacsError):
    """The PACS cannot be reached or refused, or bad credentials/URL; the message says what to do."""


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to the PACS. ``repr`` never shows the secret."""

    kind: str  # "none", "basic" or "bearer"
    user: str = ""
    secret: str = field(default="", repr=False)
    source: str = ""  # where they came from, for messages

    def apply(self, session: Any) -> None:
        """Set them on a ``requests`` session.

        Args:
            session: The ``requests.Session`` every request of the client goes through.
        """
        if self.kind == "basic":
            session.auth = (self.user, self.secret)
        elif self.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.secret}"


def credentials_from(env: Mapping[str, str], file: Path | None = None) -> Credentials:
    """The PACS credentials: from ``file`` if given, else from the environment, else none.

    The file holds one line, ``user:password`` or ``Bearer TOKEN``, and must be a regular file owned
    by this user and readable by nobody else (``chmod 600``), like an SSH key.

    Args:
        env: The environment (``os.environ``): ``ONCOFED_PACS_TOKEN``, or ``ONCOFED_PACS_USER`` and
            ``ONCOFED_PACS_PASSWORD``.
        file: A credentials file, which takes precedence over the environment.

    Returns:
        The credentials (kind ``none`` when neither gives any).

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

    Args:
        url: The URL the user gave.

    Returns:
        The URL without a trailing slash.

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
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with the credentials applied.

    Args:
        url: The DICOMweb base URL, without credentials.
        credentials: From :func:`credentials_from`.
        session: A ``requests.Session`` to use (default: a new one).
        timeout: Seconds to wait for each answer.

    Returns:
        The client; it does not retry (the caller does, see :func:`fl_client.pacs_transfer.with_retries`).

    Raises:
        DicomWebError: A URL that is not http(s) or holds credentials.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = session or requests.Session()
    credentials.apply(session)
    client = DICOMwebClient(check_url(url), session=session, timeout=timeout)
    # Its own retrying retries every exception, a refused connection included, for about 30 s per request:
    # the caller's retry loop (fl_client.pacs_transfer.with_retries) is the one, with its counts and back-off.
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
    """Whether asking again may help: network errors, 5xx and 429 answers."""
    import requests

    if isinstance(exc, requests.HTTPError):
        return exc.response is not None and (exc.response.status_code >= 500 or exc.response.status_code == 429)
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


PAGE = 500


def search_all(search: Callable[..., list[dict[str, Any]]], key: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every record of a QIDO-RS search, page by page (``limit``/``offset``), once per ``key`` tag value.

    Stops at a short page or at a page with nothing new: some servers ignore ``offset`` and send the
    first page again (dicomweb-client's own ``get_remaining`` then never ends).

    Args:
        search: A ``DICOMwebClient.search_for_*`` method.
        key: The tag (``"0020000D"``) whose value tells records apart.
        **kwargs: Passed to ``search`` with each page's ``limit`` and ``offset``.

    Returns:
        The records, in the server's order.
    """
    seen: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = search(limit=PAGE, offset=offset, **kwargs) or []
        new = 0
        for record in page:
            uid = _value(record, key)
            if uid and uid not in seen:
                seen[uid] = record
                new += 1
        if len(page) < PAGE or new == 0:
            return list(seen.values())
        offset += len(page)


def _save_instance(ds: Any, folder: Path, *, study_uid: str, sop: str | None = None) -> str:
    """Write one retrieved instance as ``<SOPInstanceUID>.dcm``, if it is of the study (and the instance) asked
    for; return its SOPInstanceUID."""
    got = str(ds.get("SOPInstanceUID", ""))
    if (sop is not None and got != sop) or str(ds.get("StudyInstanceUID", "")) != study_uid or not got:
        raise DicomWebError(f"the PACS sent another instance ({got or '?'}) for {sop or f'study {study_uid}'}")
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / f"{got}.dcm", enforce_file_format=False)
    return got


@dataclass(frozen=True)
class DicomWebPacs:
    """A PACS over DICOMweb, as :class:`imaging.pacs.PacsSource` and :class:`imaging.pacs.PacsStore`.

    Args:
        client: A ``dicomweb_client.DICOMwebClient`` (see :func:`make_client`).
    """

    client: Any

    @classmethod
    def open(cls, url: str, credentials: Credentials, *, session: Any = None, timeout: float = 60.0) -> DicomWebPacs:
        """The PACS at ``url`` with the credentials applied (no request is made yet).

        Args:
            url: The DICOMweb base URL, without credentials.
            credentials: From :func:`credentials_from`.
            session: A ``requests.Session`` to use (default: a new one).
            timeout: Seconds to wait for each answer.

        Returns:
            The client.

        Raises:
            DicomWebError: A URL that is not http(s) or holds credentials.
        """
        return cls(make_client(url, credentials, session=session, timeout=timeout))

    @property
    def url(self) -> str:
        """The DICOMweb base URL (no credentials, no trailing slash)."""
        return str(self.client.base_url)

    def _call(self, call: Callable[[], T], prefix: str = "") -> T:
        """``call()``, with any failure as one :class:`DicomWebError` line (transient for network errors,
        5xx and 429 answers)."""
        try:
            return call()
        except PacsError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets one line
            raise DicomWebError(prefix + _explain(exc, self.url), transient=_retryable(exc)) from None

    def verify(self) -> None:
        """One QIDO-RS study search for one study.

        Raises:
            DicomWebError: The PACS cannot be reached or refuses.
        """
        self._call(lambda: self.client.search_for_studies(limit=1))

    def find_studies(self, filters: Mapping[str, str]) -> list[str]:
        """The StudyInstanceUIDs a QIDO-RS study search finds, each once, page by page.

        Args:
            filters: Study search keys and values (as :func:`imaging.pacs.parse_query` gives them).

        Returns:
            The StudyInstanceUIDs, in the PACS's order.

        Raises:
            DicomWebError: The search failed.
        """
        records = self._call(lambda: search_all(self.client.search_for_studies, UID_TAGS["study"],
                                                search_filters=dict(filters)),
                             "QIDO-RS study query failed: ")
        return [uid for uid in (_value(r, UID_TAGS["study"]) for r in records) if uid]

    def find_instances(self, study_uid: str) -> list[Instance]:
        """Every instance the PACS lists for a study (QIDO-RS), page by page.

        Args:
            study_uid: The StudyInstanceUID.

        Returns:
            The instances with their series (empty for a study the PACS does not know).

        Raises:
            DicomWebError: The search failed.
        """
        records = self._call(lambda: search_all(self.client.search_for_instances, UID_TAGS["sop"],
                                                study_instance_uid=study_uid))
        listed = [Instance(study_uid, _value(r, UID_TAGS["series"]), _value(r, UID_TAGS["sop"])) for r in records]
        return [i for i in listed if i.series_uid and i.sop_instance_uid]

    def retrieve_series(self, study_uid: str, series_uid: str, *, folder: Path) -> None:
        """One WADO-RS series request, each instance written to ``folder`` as it arrives.

        Args:
            study_uid: The StudyInstanceUID.
            series_uid: The SeriesInstanceUID.
            folder: Where the ``<SOPInstanceUID>.dcm`` files go.

        Raises:
            DicomWebError: The request failed or the PACS sent an instance of another study.
        """
        def stream() -> None:
            for ds in self.client.iter_series(study_uid, series_uid, media_types=MEDIA_TYPES):
                _save_instance(ds, folder, study_uid=study_uid)

        self._call(stream)

    def retrieve_instance(self, instance: Instance, *, folder: Path) -> None:
        """One WADO-RS instance request, written to ``folder`` as ``<SOPInstanceUID>.dcm``.

        Args:
            instance: The instance.
            folder: Where the file goes.

        Raises:
            DicomWebError: The request failed or the PACS sent another instance.
        """
        ds = self._call(lambda: self.client.retrieve_instance(instance.study_uid, instance.series_uid,
                                                             instance.sop_instance_uid, media_types=MEDIA_TYPES))
        self._call(lambda: _save_instance(ds, folder, study_uid=instance.study_uid, sop=instance.sop_instance_uid))

    def store_instances(self, study_uid: str, paths: Sequence[Path]) -> list[StoredObject]:
        """One STOW-RS request with the files of one study.

        Args:
            study_uid: The StudyInstanceUID every file carries.
            paths: The DICOM files.

        Returns:
            The objects the PACS accepted.

        Raises:
            DicomWebError: The PACS refused any object (with the failure reasons) or the request failed.
        """
        items = [(path, pydicom.dcmread(path)) for path in paths]
        answer = self._call(lambda: self.client.store_instances([ds for _, ds in items], study_instance_uid=study_uid),
                            f"STOW-RS of study {study_uid} failed: ")
        failed = answer.get("FailedSOPSequence", []) if answer is not None else []
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise DicomWebError(f"the PACS refused {len(failed)} object(s) of study {study_uid} (failure reasons "
                                f"{reasons})")
        ok = {str(item.ReferencedSOPInstanceUID)
              for item in (answer.get("ReferencedSOPSequence", []) if answer is not None else [])}
        return [StoredObject(str(ds.SOPInstanceUID), study_uid, str(ds.SeriesInstanceUID), str(path))
                for path, ds in items if str(ds.SOPInstanceUID) in ok]
