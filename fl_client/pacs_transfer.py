"""Studies between the site's PACS and its workspace, for any PACS protocol: pull a cohort's new instances
into the workspace and record each study's fetch in the site catalog; store DICOM objects (saliency maps,
key images) to the PACS and record what it accepted.

The PACS is anything with the methods of :class:`imaging.pacs.PacsSource` (to pull) or
:class:`imaging.pacs.PacsStore` (to store); :func:`connect` opens one from its URL (DICOMweb for http(s),
so far). Adding a protocol is a client module in ``imaging/`` and one branch in :func:`connect`.

Pulled instances land in ``WS/pacs/store/<study>/<series>/<sop>.dcm`` and are then cataloged by the
same folder ingest as any DICOM folder (same validation, same reasons). A study's new instances are
downloaded into ``WS/pacs/partial/<study>/`` first and moved into the store only when every one of
them arrived and is the instance that was asked for; a study that fails half-way leaves nothing in
the store and is reported with its reason, so a half-downloaded study is never cataloged. A series that
is new as a whole is asked for in one series request; only a series partly here already is asked for
instance by instance. Re-running asks the PACS what each study holds and fetches only the instances not
in the store yet. Transient failures (network errors, a busy PACS) are retried with exponential
back-off (a series from its start).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial as partial_call
from pathlib import Path
from typing import TypeAlias, TypeVar

import pydicom

from fl_client.workspace import Workspace
from imaging.catalog import Catalog
from imaging.dicomweb import DicomWebPacs, credentials_from
from imaging.pacs import Instance, PacsError, PacsSource, PacsStore, StoredObject

__all__ = [
    "FetchStatus",
    "Pacs",
    "StudyFetch",
    "connect",
    "fetch_and_record",
    "fetch_studies",
    "fetch_study",
    "find_cohort",
    "store_and_record",
    "with_retries",
]

# The clients :func:`connect` opens; each has the methods of both PacsSource and PacsStore.
Pacs: TypeAlias = DicomWebPacs
T = TypeVar("T")


class FetchStatus(StrEnum):
    """What happened to a study asked for (as the site catalog records it)."""

    FETCHED = "fetched"  # new instances came
    UP_TO_DATE = "up-to-date"  # every instance was here already
    FAILED = "failed"  # nothing of this run kept; the reason says why


@dataclass(frozen=True)
class StudyFetch:
    """What happened to one study.

    Args:
        study_uid: The StudyInstanceUID.
        status: Fetched, up to date or failed.
        instances: Instances the PACS lists for it.
        fetched: Instances new this run.
        attempts: Requests made for it, retries included.
        seconds: Time it took.
        reason: Why it failed (empty otherwise).
    """

    study_uid: str
    status: FetchStatus
    instances: int = 0
    fetched: int = 0
    attempts: int = 0
    seconds: float = 0.0
    reason: str = ""


def connect(url: str, *, credentials: Path | None = None, env: Mapping[str, str] | None = None) -> Pacs:
    """The PACS at ``url``, checked with one small request so that a wrong address or refused credentials
    are one clear error before anything else.

    Args:
        url: Where the PACS is: a DICOMweb base URL (``http(s)://host[:port]/path``).
        credentials: A credentials file (``user:password`` or ``Bearer TOKEN``, ``chmod 600``); without it
            the environment's ``ONCOFED_PACS_*`` variables, if any.
        env: The environment to read credentials from (default ``os.environ``).

    Returns:
        A client with the methods of :class:`imaging.pacs.PacsSource` and :class:`imaging.pacs.PacsStore`.

    Raises:
        PacsError: A bad URL or credentials file, or the PACS cannot be reached or refuses.
    """
    pacs = DicomWebPacs.open(url, credentials_from(os.environ if env is None else env, credentials))
    with_retries(pacs.verify, retries=1, backoff=1.0)
    return pacs


def with_retries(call: Callable[[], T], *, retries: int, backoff: float,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[T, int]:
    """``call()``, asked again after a transient :class:`imaging.pacs.PacsError`, ``retries`` times, waiting
    ``backoff · 2^k`` seconds before retry ``k + 1``.

    Args:
        call: One request to the PACS.
        retries: How many times to ask again at most.
        backoff: Seconds before the first retry (doubled for each next one).
        sleep: How to wait (tests pass a recorder).

    Returns:
        The result and the attempts it took.

    Raises:
        PacsError: Not transient (at once), or still failing after the retries.
        Exception: Anything else ``call`` raises, at once.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return call(), attempt
        except PacsError as exc:
            if attempt > retries or not exc.transient:
                raise
            sleep(backoff * 2 ** (attempt - 1))


def find_cohort(source: PacsSource, *, studies: Sequence[str] = (), filters: Mapping[str, str] | None = None,
                retries: int = 3, backoff: float = 1.0) -> list[str]:
    """The StudyInstanceUIDs to pull: those given, and those a study search finds, in order, once each.

    Args:
        source: The PACS.
        studies: StudyInstanceUIDs asked for by name.
        filters: A study search (from :func:`imaging.pacs.parse_query`, so only study search keys;
            empty: every study); ``None``: no search.
        retries: Retries of the search after transient failures.
        backoff: Seconds before the first retry.

    Returns:
        The StudyInstanceUIDs (how many a dry run reports).

    Raises:
        PacsError: The search failed.
    """
    found = list(dict.fromkeys(studies))
    if filters is not None:
        matched, _ = with_retries(partial_call(source.find_studies, filters), retries=retries, backoff=backoff)
        found += [uid for uid in dict.fromkeys(matched) if uid not in found]
    return found


def _local_instances(store: Path, study_uid: str) -> set[str]:
    """SOPInstanceUIDs of a study already in the local store (file names are the UIDs)."""
    folder = store / study_uid
    return {p.stem for p in folder.rglob("*.dcm")} if folder.is_dir() else set()


def _check_arrived(folder: Path, series_uid: str, wanted: set[str]) -> None:
    """Raise unless ``folder`` holds exactly the ``wanted`` instances."""
    got = {p.stem for p in folder.glob("*.dcm")} if folder.is_dir() else set()
    extra = sorted(got - wanted)
    if extra:
        raise PacsError(f"the PACS sent an instance ({extra[0]}) that series {series_uid} does not list")
    if got != wanted:
        raise PacsError(f"series {series_uid}: the PACS sent {len(got)} of its {len(wanted)} instances")


def _retrieve_series(source: PacsSource, study_uid: str, series_uid: str, folder: Path) -> None:
    """One attempt at a whole series, from its start."""
    shutil.rmtree(folder, ignore_errors=True)
    source.retrieve_series(study_uid, series_uid, folder=folder)


def _retrieve(source: PacsSource, partial: Path, listed: Sequence[Instance], missing: Sequence[Instance], *,
              retries: int, backoff: float, sleep: Callable[[float], None]) -> int:
    """Bring the missing instances into ``partial/<series>/``; return the attempts it took.

    A series missing as a whole is one series request; otherwise only its missing instances are asked for.
    """
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    in_series: dict[str, set[str]] = {}
    for i in listed:
        in_series.setdefault(i.series_uid, set()).add(i.sop_instance_uid)
    needed: dict[str, list[Instance]] = {}
    for i in missing:
        needed.setdefault(i.series_uid, []).append(i)
    attempts = 0
    for series_uid, instances in needed.items():
        folder = partial / series_uid
        wanted = {i.sop_instance_uid for i in instances}
        if wanted == in_series[series_uid]:
            _, n = with_retries(partial_call(_retrieve_series, source, instances[0].study_uid, series_uid, folder),
                                retries=retries, backoff=backoff, sleep=sleep)
            attempts += n
        else:
            for instance in sorted(instances):
                _, n = with_retries(partial_call(source.retrieve_instance, instance, folder=folder),
                                    retries=retries, backoff=backoff, sleep=sleep)
                attempts += n
        _check_arrived(folder, series_uid, wanted)
    return attempts


def fetch_study(source: PacsSource, workspace: Path, study_uid: str, *, retries: int = 3, backoff: float = 1.0,
                sleep: Callable[[float], None] = time.sleep) -> StudyFetch:
    """Bring one study's new instances into the workspace's PACS store, all of them or none.

    Args:
        source: The PACS.
        workspace: The site workspace.
        study_uid: The StudyInstanceUID.
        retries: Retries of each request after transient failures.
        backoff: Seconds before the first retry of a request.
        sleep: How to wait between retries.

    Returns:
        What happened. A PACS or network failure is a ``failed`` result with the reason, never raised.
    """
    t0 = time.perf_counter()
    ws = Workspace.of(workspace)
    store, partial = ws.pacs_store, ws.pacs_partial / study_uid
    status, reason, instances, fetched, attempts = FetchStatus.FAILED, "", 0, 0, 0
    try:
        listed, attempts = with_retries(partial_call(source.find_instances, study_uid), retries=retries,
                                        backoff=backoff, sleep=sleep)
        instances = len(listed)
        have = _local_instances(store, study_uid)
        missing = [i for i in listed if i.sop_instance_uid not in have]
        if not listed:
            reason = "the PACS lists no instances of this study; check the UID"
        elif not missing:
            status = FetchStatus.UP_TO_DATE
        else:
            attempts += _retrieve(source, partial, listed, missing, retries=retries, backoff=backoff, sleep=sleep)
            # Complete: move the study's new files into the store (renames within one file system).
            for file in sorted(partial.rglob("*.dcm")):
                final = store / study_uid / file.relative_to(partial)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, final)
            status, fetched = FetchStatus.FETCHED, len(missing)
    except PacsError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - one study's failure never stops the others
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return StudyFetch(study_uid, status, instances=instances, fetched=fetched, attempts=attempts,
                      seconds=time.perf_counter() - t0, reason=reason)


def fetch_studies(source: PacsSource, workspace: Path, studies: Sequence[str], *, retries: int = 3,
                  backoff: float = 1.0, on_study: Callable[[int, int, StudyFetch], None] | None = None
                  ) -> list[StudyFetch]:
    """:func:`fetch_study` for each study, one after the other.

    Args:
        source: The PACS.
        workspace: The site workspace.
        studies: The StudyInstanceUIDs.
        retries: Retries of each request after transient failures.
        backoff: Seconds before the first retry of a request.
        on_study: Called as ``on_study(done, total, result)`` after each study.

    Returns:
        One result per study, in order.
    """
    out = []
    for i, uid in enumerate(studies, start=1):
        out.append(fetch_study(source, workspace, uid, retries=retries, backoff=backoff))
        if on_study is not None:
            on_study(i, len(studies), out[-1])
    return out


def fetch_and_record(source: PacsSource, catalog: Catalog, workspace: Path, studies: Sequence[str], *,
                     retries: int = 3, backoff: float = 1.0,
                     on_study: Callable[[int, int, StudyFetch], None] | None = None) -> list[StudyFetch]:
    """:func:`fetch_studies`, then each study's outcome recorded in the site catalog (one transaction).

    The fetched files are not cataloged here: ingest ``Workspace(workspace).pacs_store`` as a DICOM folder next.

    Args:
        source: The PACS.
        catalog: The site catalog of ``workspace``.
        workspace: The site workspace.
        studies: The StudyInstanceUIDs (from :func:`find_cohort`).
        retries: Retries of each request after transient failures.
        backoff: Seconds before the first retry of a request.
        on_study: Called as ``on_study(done, total, result)`` after each study.

    Returns:
        One result per study, in order.
    """
    results = fetch_studies(source, workspace, studies, retries=retries, backoff=backoff, on_study=on_study)
    with catalog.transaction():
        for r in results:
            catalog.record_fetch(source.url, r.study_uid, status=r.status, instances=r.instances,
                                 fetched=r.fetched, reason=r.reason)
    return results


def store_and_record(store: PacsStore, catalog: Catalog, paths: Sequence[Path], *, retries: int = 3,
                     backoff: float = 1.0) -> list[StoredObject]:
    """Store DICOM files to the PACS, one request per study, then record what it accepted in the site catalog.

    Args:
        store: The PACS.
        catalog: The site catalog.
        paths: The DICOM files (saliency objects, key images).
        retries: Retries of each study's request after transient failures.
        backoff: Seconds before the first retry of a request.

    Returns:
        The objects the PACS accepted.

    Raises:
        PacsError: The PACS refused or failed for a study; what it accepted before (earlier studies) is recorded
            first, so the catalog never forgets an object that is in the PACS.
    """
    by_study: dict[str, list[Path]] = {}
    for path in paths:
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                        .StudyInstanceUID)
        by_study.setdefault(study_uid, []).append(path)
    stored: list[StoredObject] = []
    for study_uid, files in by_study.items():
        accepted, _ = with_retries(partial_call(store.store_instances, study_uid, files), retries=retries,
                                   backoff=backoff)
        with catalog.transaction():  # each study's objects as soon as the PACS holds them
            catalog.record_stored(store.url, accepted)
        stored += accepted
    return stored
