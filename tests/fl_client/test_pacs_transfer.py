"""The site's PACS transfers (fl_client/pacs_transfer.py) against an in-process PACS that has the methods of
imaging.pacs.PacsSource and PacsStore and records every request: cohorts, all-or-nothing fetches, only
what is new, retries, and what the site catalog records.

The same code against a real PACS (Orthanc over DICOMweb): tests/imaging/test_dicomweb.py and, through the
command line, tests/fl_client/test_pacs_cli.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_series

from fl_client.pacs_transfer import (
    FetchStatus,
    StudyFetch,
    fetch_and_record,
    fetch_study,
    find_cohort,
    store_and_record,
    with_retries,
)
from fl_client.workspace import Workspace
from imaging.catalog import Catalog
from imaging.pacs import Instance, PacsError, PacsSource, PacsStore, StoredObject, parse_query

STUDY, OTHER = "1.2.826.0.1.1", "1.2.826.0.1.2"


@dataclass
class FakePacs:
    """A PACS in memory: ``holds[study][series]`` lists its instances. ``fail[request]`` raises the given
    errors in turn (a request is ``"series <uid>"``, ``"instance <uid>"``, ``"instances <study>"``,
    ``"studies"`` or ``"store <study>"``); ``sends_extra[series]`` adds an instance the listing lacks;
    ``refuses`` are SOPInstanceUIDs a store leaves out of what it accepts."""

    holds: dict[str, dict[str, list[str]]]
    url: str = "fake://pacs-a"
    matches: list[str] = field(default_factory=list)
    fail: dict[str, list[BaseException]] = field(default_factory=dict)
    sends_extra: dict[str, str] = field(default_factory=dict)
    refuses: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def _ask(self, request: str) -> None:
        self.requests.append(request)
        if self.fail.get(request):
            raise self.fail[request].pop(0)

    def verify(self) -> None:
        self._ask("verify")

    def find_studies(self, filters: Mapping[str, str]) -> list[str]:
        self._ask("studies")
        self.requests[-1] += " " + "&".join(f"{k}={v}" for k, v in sorted(filters.items()))
        return list(self.matches)

    def find_instances(self, study_uid: str) -> list[Instance]:
        self._ask(f"instances {study_uid}")
        return [Instance(study_uid, series, sop) for series, sops in self.holds.get(study_uid, {}).items()
                for sop in sops]

    def retrieve_series(self, study_uid: str, series_uid: str, *, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        sops = self.holds[study_uid][series_uid]
        (folder / f"{sops[0]}.dcm").write_bytes(b"first instance")  # a failure comes after some files arrived
        self._ask(f"series {series_uid}")
        for sop in [*sops, *([self.sends_extra[series_uid]] if series_uid in self.sends_extra else [])]:
            (folder / f"{sop}.dcm").write_bytes(b"an instance")

    def retrieve_instance(self, instance: Instance, *, folder: Path) -> None:
        self._ask(f"instance {instance.sop_instance_uid}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{instance.sop_instance_uid}.dcm").write_bytes(b"an instance")

    def store_instances(self, study_uid: str, paths: Sequence[Path]) -> list[StoredObject]:
        self._ask(f"store {study_uid}")
        out = []
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert str(ds.StudyInstanceUID) == study_uid, "one study per request"
            if str(ds.SOPInstanceUID) not in self.refuses:
                out.append(StoredObject(str(ds.SOPInstanceUID), study_uid, str(ds.SeriesInstanceUID), str(path)))
        return out


def _pacs(**kwargs: object) -> FakePacs:
    holds = {STUDY: {"s1": ["i1", "i2", "i3"], "s2": ["i4", "i5"]}, OTHER: {"s3": ["i6"]}}
    return FakePacs(holds, **kwargs)  # type: ignore[arg-type]


def _here(ws: Path, study: str = STUDY) -> set[str]:
    return {p.stem for p in (Workspace(ws).pacs_store / study).rglob("*.dcm")}


def test_the_fake_has_the_protocols_methods() -> None:
    source: PacsSource = _pacs()  # mypy checks the fake against the protocols
    store: PacsStore = _pacs()
    assert source.url == store.url


def test_a_query_with_an_unknown_key_is_refused_before_the_pacs_is_asked() -> None:
    pacs = _pacs(matches=[STUDY])
    for query, needle in [("Modlity=MR", "did you mean 'Modality'"), ("BodyPart=CHEST", "not a study search key"),
                          ("Modality", "KEY=VALUE"), ("StudyDate=", "has no value")]:
        with pytest.raises(PacsError, match=needle) as caught:
            find_cohort(pacs, filters=parse_query(query))
        assert not caught.value.transient
    assert pacs.requests == []
    # A good query reaches the PACS as standard study keys (Modality is a series attribute).
    assert find_cohort(pacs, filters=parse_query("Modality=CT&StudyDate=20200101-20211231")) == [STUDY]
    assert pacs.requests == ["studies ModalitiesInStudy=CT&StudyDate=20200101-20211231"]


def test_the_cohort_is_counted_without_fetching_anything(tmp_path: Path) -> None:
    pacs = _pacs(matches=[OTHER, STUDY, OTHER])
    # Named studies first, then the search's, each once; no search without a query.
    assert find_cohort(pacs, studies=[STUDY, STUDY]) == [STUDY] and pacs.requests == []
    cohort = find_cohort(pacs, studies=[STUDY], filters={})
    assert cohort == [STUDY, OTHER] and pacs.requests == ["studies "]
    assert not any(r.startswith(("series", "instance")) for r in pacs.requests)
    assert not (tmp_path / "pacs").exists()


def test_new_series_come_whole_and_only_missing_instances_are_asked_again(tmp_path: Path) -> None:
    pacs = _pacs()
    first = fetch_study(pacs, tmp_path, STUDY)
    assert (first.status, first.instances, first.fetched) == (FetchStatus.FETCHED, 5, 5)
    assert pacs.requests == [f"instances {STUDY}", "series s1", "series s2"]  # one request per new series
    assert first.attempts == 3 and _here(tmp_path) == {"i1", "i2", "i3", "i4", "i5"}
    assert (Workspace(tmp_path).pacs_store / STUDY / "s2" / "i5.dcm").is_file()
    assert not (Workspace(tmp_path).pacs_partial / STUDY).exists()
    # Nothing new: the listing only.
    pacs.requests.clear()
    again = fetch_study(pacs, tmp_path, STUDY)
    assert (again.status, again.fetched) == (FetchStatus.UP_TO_DATE, 0) and pacs.requests == [f"instances {STUDY}"]
    # Two instances of s1 lost here, and the PACS has a new series: those instances alone, the series whole.
    for sop in ("i1", "i3"):
        (Workspace(tmp_path).pacs_store / STUDY / "s1" / f"{sop}.dcm").unlink()
    pacs.holds[STUDY]["s9"] = ["i9"]
    pacs.requests.clear()
    third = fetch_study(pacs, tmp_path, STUDY)
    assert (third.status, third.fetched) == (FetchStatus.FETCHED, 3)
    assert pacs.requests == [f"instances {STUDY}", "instance i1", "instance i3", "series s9"]
    assert _here(tmp_path) == {"i1", "i2", "i3", "i4", "i5", "i9"}


def test_a_study_that_fails_half_way_leaves_nothing_and_says_why(tmp_path: Path) -> None:
    waits: list[float] = []
    down = _pacs(fail={"series s2": [PacsError("cannot connect to fake://pacs-a", transient=True)] * 3})
    result = fetch_study(down, tmp_path, STUDY, retries=2, backoff=0.5, sleep=waits.append)
    assert (result.status, result.reason) == (FetchStatus.FAILED, "cannot connect to fake://pacs-a")
    assert waits == [0.5, 1.0] and down.requests.count("series s2") == 3  # retried with back-off, from the start
    assert _here(tmp_path) == set()  # s1 came, but is not kept
    assert not (Workspace(tmp_path).pacs_partial / STUDY).exists()
    # A refusal is not retried.
    refused = _pacs(fail={"series s1": [PacsError("the PACS refused the credentials (HTTP 401)")]})
    assert fetch_study(refused, tmp_path, STUDY, sleep=waits.append).status == FetchStatus.FAILED
    assert refused.requests.count("series s1") == 1 and len(waits) == 2
    # Transient trouble that passes: the study arrives whole; attempts count the retries.
    flaky = _pacs(fail={"series s1": [PacsError("the PACS answered HTTP 503", transient=True)]})
    ok = fetch_study(flaky, tmp_path, STUDY, backoff=0.0)
    assert ok.status == FetchStatus.FETCHED and ok.attempts == 1 + 2 + 1 and len(_here(tmp_path)) == 5


def test_a_series_that_does_not_match_its_listing_is_not_kept(tmp_path: Path) -> None:
    extra = fetch_study(_pacs(sends_extra={"s2": "i99"}), tmp_path, STUDY)
    assert extra.status == FetchStatus.FAILED
    assert extra.reason == "the PACS sent an instance (i99) that series s2 does not list"
    short = _pacs()
    short.retrieve_series = lambda study_uid, series_uid, *, folder: folder.mkdir(parents=True)  # type: ignore[method-assign]
    result = fetch_study(short, tmp_path, STUDY)
    assert result.reason == "series s1: the PACS sent 0 of its 3 instances" and _here(tmp_path) == set()
    unknown = fetch_study(_pacs(), tmp_path, "1.2.3.4.5")
    assert unknown.status == FetchStatus.FAILED and "lists no instances" in unknown.reason


def test_one_study_failing_in_any_way_does_not_stop_the_others(tmp_path: Path) -> None:
    pacs = _pacs(fail={f"instances {STUDY}": [OSError(28, "No space left on device")]})
    with Catalog.open(tmp_path) as catalog:
        results = fetch_and_record(pacs, catalog, tmp_path, [STUDY, OTHER])
    assert [r.status for r in results] == [FetchStatus.FAILED, FetchStatus.FETCHED]
    assert results[0].reason == "OSError: [Errno 28] No space left on device"


def test_each_fetch_is_recorded_with_the_pacs_it_came_from(tmp_path: Path) -> None:
    pacs = _pacs()
    seen: list[tuple[int, int, str]] = []

    def progress(n: int, total: int, result: StudyFetch) -> None:
        seen.append((n, total, result.status))

    with Catalog.open(tmp_path) as catalog:
        fetch_and_record(pacs, catalog, tmp_path, [STUDY], on_study=progress)
        fetch_and_record(pacs, catalog, tmp_path, [STUDY, "1.2.3.4.5"], on_study=progress)
    assert seen == [(1, 1, "fetched"), (1, 2, "up-to-date"), (2, 2, "failed")]
    with sqlite3.connect(tmp_path / "catalog.sqlite") as db:
        rows = db.execute("SELECT study_uid, url, status, instances, fetched, reason FROM pacs_fetches "
                          "ORDER BY study_uid").fetchall()
    assert rows == [("1.2.3.4.5", "fake://pacs-a", "failed", 0, 0,
                     "the PACS lists no instances of this study; check the UID"),
                    (STUDY, "fake://pacs-a", "up-to-date", 5, 0, None)]  # the last fetch of each study


def _objects(tmp_path: Path) -> list[Path]:
    """Three DICOM objects of two studies."""
    a, _, _ = write_series(tmp_path / "a", n=2, rows=4, cols=4, study_uid=STUDY, seed=1)
    b, _, _ = write_series(tmp_path / "b", n=1, rows=4, cols=4, study_uid=OTHER, seed=2)
    return [a[0], b[0], a[1]]


def test_what_the_pacs_accepts_is_recorded_one_request_per_study(tmp_path: Path) -> None:
    files = _objects(tmp_path)
    sops = [str(pydicom.dcmread(p).SOPInstanceUID) for p in files]
    pacs = _pacs(refuses={sops[2]}, fail={f"store {OTHER}": [PacsError("the PACS answered HTTP 503", transient=True)]})
    with Catalog.open(tmp_path / "ws") as catalog:
        stored = store_and_record(pacs, catalog, files, backoff=0.0)
        rows = [(r["sop_instance_uid"], r["url"], r["study_uid"], r["file"]) for r in catalog.stored_rows()]
    assert pacs.requests == [f"store {STUDY}", f"store {OTHER}", f"store {OTHER}"]
    assert sorted(s.sop_instance_uid for s in stored) == sorted(sops[:2])
    assert sorted(rows) == sorted([(sops[0], "fake://pacs-a", STUDY, str(files[0])),
                                   (sops[1], "fake://pacs-a", OTHER, str(files[1]))])


def test_a_refused_store_is_raised_and_what_the_pacs_already_holds_is_recorded(tmp_path: Path) -> None:
    pacs = _pacs(fail={f"store {OTHER}": [PacsError(f"the PACS refused 1 object(s) of study {OTHER}")]})
    files = _objects(tmp_path)
    with Catalog.open(tmp_path / "ws") as catalog:
        with pytest.raises(PacsError, match="refused 1 object"):
            store_and_record(pacs, catalog, files)
        # The first study's two objects are in the PACS: the catalog knows them; nothing of the refused study.
        assert sorted(r["file"] for r in catalog.stored_rows()) == sorted([str(files[0]), str(files[2])])
    assert pacs.requests == [f"store {STUDY}", f"store {OTHER}"]


def test_retries_are_for_transient_failures_only() -> None:
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("a bug, not the network")

    with pytest.raises(ValueError):
        with_retries(broken, retries=3, backoff=0.0)
    assert calls == [1]
    answers = iter([PacsError("busy", transient=True), None])

    def busy_once() -> str:
        error = next(answers)
        if error is not None:
            raise error
        return "ok"

    waits: list[float] = []
    assert with_retries(busy_once, retries=1, backoff=2.0, sleep=waits.append) == ("ok", 2) and waits == [2.0]
