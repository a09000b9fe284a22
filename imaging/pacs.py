"""What the site asks of a PACS, whatever protocol it speaks: the :class:`PacsSource` and :class:`PacsStore`
protocols, the study search keys a cohort query may use, and the error every client raises.

A client implements the protocols structurally, without a base class: :class:`imaging.dicomweb.DicomWebPacs`
speaks DICOMweb (QIDO-RS, WADO-RS, STOW-RS); a DIMSE client (C-FIND, C-MOVE or C-GET, C-STORE) would have
the same methods. What the site does with them (pull a cohort into its workspace, all of a study or none
of it; store saliency objects; record both in the site catalog) is :mod:`fl_client.pacs_transfer`,
written once for every protocol.

Each method makes one request (or one paged search) and does not retry: a failure is a
:class:`PacsError` whose message says what went wrong and what to do, marked ``transient`` when asking
again may help (a network error, a busy server); the caller decides whether to ask again.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, Protocol
from urllib.parse import parse_qsl

__all__ = [
    "STUDY_KEYS",
    "STUDY_QUERY_KEYS",
    "Instance",
    "PacsError",
    "PacsSource",
    "PacsStore",
    "StoredObject",
    "parse_query",
]

# Study-level searches match these; "Modality" is a series attribute, asked as ModalitiesInStudy.
STUDY_KEYS = MappingProxyType({"Modality": "ModalitiesInStudy"})
# The study-level matching keys a PACS must support (PS3.18 QIDO-RS, Study; the study-level keys of a
# DIMSE C-FIND, PS3.4 C.6.2): a key outside them may be ignored by the PACS, which would then answer with
# every study it holds.
STUDY_QUERY_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                    "PatientName", "PatientID", "StudyInstanceUID", "StudyID", "StudyDescription")


class PacsError(Exception):
    """The PACS cannot be reached, refused, or answered wrongly; or a bad query. The message says what to do.

    Args:
        message: One line: what went wrong and what to do about it (never a secret or pixel data).
        transient: Whether asking again may succeed (a network error, a 5xx or 429 answer).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class Instance(NamedTuple):
    """One instance a PACS lists for a study."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str


class StoredObject(NamedTuple):
    """One object a PACS accepted, in the order :meth:`imaging.catalog.Catalog.record_stored` takes."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    file: str


class PacsSource(Protocol):
    """A PACS the site pulls studies from."""

    @property
    def url(self) -> str:
        """Where the PACS is, as the site catalog records it (never with credentials)."""
        ...

    def verify(self) -> None:
        """One small request, so that a wrong address or refused credentials are one clear error up front.

        Raises:
            PacsError: The PACS cannot be reached or refuses.
        """
        ...

    def find_studies(self, filters: Mapping[str, str]) -> list[str]:
        """The StudyInstanceUIDs of the studies that match, each once.

        Args:
            filters: Study search keys (from :data:`STUDY_QUERY_KEYS`, as :func:`parse_query` gives them)
                and their values; empty: every study.

        Returns:
            The matching StudyInstanceUIDs, in the PACS's order.

        Raises:
            PacsError: The search failed.
        """
        ...

    def find_instances(self, study_uid: str) -> list[Instance]:
        """Every instance the PACS holds of a study, each once (empty for a study it does not know).

        Args:
            study_uid: The StudyInstanceUID.

        Returns:
            The instances, with their series.

        Raises:
            PacsError: The search failed.
        """
        ...

    def retrieve_series(self, study_uid: str, series_uid: str, *, folder: Path) -> None:
        """Write every instance of a series into ``folder`` (created if missing) as ``<SOPInstanceUID>.dcm``.

        Args:
            study_uid: The StudyInstanceUID.
            series_uid: The SeriesInstanceUID.
            folder: Where the files go.

        Raises:
            PacsError: The retrieval failed, or the PACS sent an instance of another study.
        """
        ...

    def retrieve_instance(self, instance: Instance, *, folder: Path) -> None:
        """Write one instance into ``folder`` (created if missing) as ``<SOPInstanceUID>.dcm``.

        Args:
            instance: The instance, as :meth:`find_instances` listed it.
            folder: Where the file goes.

        Raises:
            PacsError: The retrieval failed, or the PACS sent another instance.
        """
        ...


class PacsStore(Protocol):
    """A PACS the site stores DICOM objects to (saliency maps and key images)."""

    @property
    def url(self) -> str:
        """Where the PACS is, as the site catalog records it (never with credentials)."""
        ...

    def verify(self) -> None:
        """One small request, so that a wrong address or refused credentials are one clear error up front.

        Raises:
            PacsError: The PACS cannot be reached or refuses.
        """
        ...

    def store_instances(self, study_uid: str, paths: Sequence[Path]) -> list[StoredObject]:
        """Store DICOM files of one study.

        Args:
            study_uid: The StudyInstanceUID every file carries.
            paths: The files.

        Returns:
            The objects the PACS accepted.

        Raises:
            PacsError: The PACS refused any of them (the message says why) or the request failed.
        """
        ...


def parse_query(query: str) -> dict[str, str]:
    """``"Modality=CT&StudyDate=20200101-20201231"`` as study search filters, checked before any PACS is asked.

    Args:
        query: ``KEY=VALUE`` pairs joined by ``&``; keys from :data:`STUDY_QUERY_KEYS` or ``Modality``.

    Returns:
        The filters, keyed by the DICOM attribute keyword (``Modality`` becomes ``ModalitiesInStudy``).

    Raises:
        PacsError: A part is not ``key=value``, a key is not a study search key (the message names the
            closest one), or a value is empty.
    """
    filters: dict[str, str] = {}
    for part in [p for p in query.split("&") if p.strip()]:
        if "=" not in part:
            raise PacsError(f"--query part {part!r}: expected KEY=VALUE pairs joined by '&', "
                            "e.g. Modality=CT&StudyDate=20200101-20201231")
    for key, value in parse_qsl(query, keep_blank_values=True):
        name = STUDY_KEYS.get(key.strip(), key.strip())
        if name not in STUDY_QUERY_KEYS:
            close = difflib.get_close_matches(key.strip(), [*STUDY_KEYS, *STUDY_QUERY_KEYS], n=1)
            raise PacsError(f"--query key {key.strip()!r} is not a study search key"
                            + (f"; did you mean {close[0]!r}?" if close else "")
                            + f" (a PACS may ignore an unknown key and return every study it holds). Keys: "
                            f"Modality, {', '.join(STUDY_QUERY_KEYS)}")
        if not value.strip():
            raise PacsError(f"--query key {key.strip()!r} has no value: give one or leave the key out")
        filters[name] = value.strip()
    return filters
