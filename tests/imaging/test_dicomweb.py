"""The PACS over DICOMweb, against a real Orthanc: a PACS ingest catalogs exactly what a folder ingest
does, re-runs fetch only what is new, failures leave no half study, objects go back and read again.

:class:`imaging.dicomweb.DicomWebPacs` is driven here by the site's transfer code
(:mod:`fl_client.pacs_transfer`), as at a site; ``tests/fl_client/test_pacs_transfer.py`` covers that code
against an in-process PACS."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from fl_client.pacs_transfer import (
    fetch_studies,
    fetch_study,
    find_cohort,
    store_and_record,
    with_retries,
)
from fl_client.workspace import Workspace
from imaging.catalog import Catalog
from imaging.dicomweb import Credentials, DicomWebError, DicomWebPacs, credentials_from, make_client
from imaging.ingest import ingest_folder
from imaging.pacs import Instance, PacsError, PacsSource, PacsStore, parse_query

# Real files from other software, one SOP instance each (the lossless twins share their UID with MR_small,
# so one of them stands for all); rtdose is not an image and must be rejected the same way both times.
VENDOR_FILES = ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_small_odd.dcm", "rtdose.dcm")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    """A running Orthanc holding a synthetic site and pydicom's files; the folder of exactly what it holds."""
    from consortium import make_workspaces
    from orthanc import orthanc

    root = tmp_path_factory.mktemp("pacs")
    with orthanc(root / "orthanc") as server:
        make_workspaces(root / "synth", sites=1, studies_per_task=4, seed=7, tasks=["lung-ct", "breast-mg"])
        files = sorted(p for p in (root / "synth" / "data" / "site-a" / "dicom").rglob("*") if p.is_file())
        files += [Path(str(get_testdata_file(name))) for name in VENDOR_FILES]
        held = root / "held"  # exactly the files the PACS took, as a folder
        held.mkdir()
        for i, path in enumerate(server.upload(files)):
            shutil.copy(path, held / f"{i:04d}.dcm")
        yield server, held


def client_of(server: Any, session: requests.Session | None = None) -> DicomWebPacs:
    return DicomWebPacs.open(server.dicomweb, Credentials("basic", server.user, server.password), session=session)


def _strip(value: Any) -> Any:
    """JSON without the keys that name a file on disk."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in ("path", "size", "mtime_ns")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _plan(plan: dict[str, Any]) -> dict[str, Any]:
    """An image plan without the file of each slice (``[path, frame, slope, intercept]``)."""
    return {**plan, "slices": [ref[1:] for ref in plan["slices"]]}


def _unnamed(row: Any) -> tuple[Any, ...]:
    """A row with file names in its messages replaced (the two ingests name their files differently)."""
    return tuple(re.sub(r"[^\s:]+\.dcm", "<file>", v) if isinstance(v, str) else v for v in row)


def catalog_rows(workspace: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The catalog's rows, with file paths, sizes and times (and the per-catalog pseudonyms) left out."""
    with sqlite3.connect(workspace / "catalog.sqlite") as db:
        files = [_unnamed((*r[:6], json.dumps(_strip(json.loads(r[6])) if r[6] else None)))
                 for r in db.execute("SELECT status, reason, message, sop_instance_uid, series_uid, study_uid, "
                                     "header FROM files")]
        series = [_unnamed(r) for r in db.execute("SELECT * FROM series")]
        images = [(*r[:-1], json.dumps(_plan(json.loads(r[-1])))) for r in db.execute("SELECT * FROM images")]
        studies = list(db.execute("SELECT study_uid, patient_id, patient_name, accession, study_date FROM studies"))
        annotations = [_unnamed(r) for r in db.execute(
            "SELECT sop_instance_uid, annotation_series_uid, study_uid, series_uid, image_key, kind, mask_file, "
            "voxels, lesions, status, reason, message FROM annotations")]
    return {name: sorted(rows, key=repr) for name, rows in
            (("files", files), ("series", series), ("images", images), ("studies", studies),
             ("annotations", annotations))}


def test_a_pacs_ingest_catalogs_what_a_folder_ingest_does(pacs: tuple[Any, Path], tmp_path: Path) -> None:
    server, held = pacs
    with Catalog.open(tmp_path / "folder") as catalog:
        ingest_folder(catalog, held)
    client = client_of(server)
    studies = find_cohort(client, filters={})
    assert len(studies) == server.statistics()["CountStudies"]
    ws = tmp_path / "pacs"
    results = fetch_studies(client, ws, studies)
    assert {r.status for r in results} == {"fetched"}, [(r.study_uid, r.reason) for r in results]
    assert sum(r.fetched for r in results) == server.statistics()["CountInstances"] == len(list(held.iterdir()))
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, Workspace(ws).pacs_store)
    folder_rows, pacs_rows = catalog_rows(tmp_path / "folder"), catalog_rows(ws)
    for table in ("files", "series", "images", "studies", "annotations"):
        assert pacs_rows[table] == folder_rows[table], table
    # The lesions' SEG objects came with their studies and mark their images.
    assert pacs_rows["annotations"] and {r[9] for r in pacs_rows["annotations"]} == {"ok"}
    # rtdose is not an image: rejected, with the same reason both ways (the rows above are equal).
    assert any(r[0] == "rejected" for r in pacs_rows["files"]) or any("rejected" in r for r in pacs_rows["series"])
    # The RLE file came back in its own transfer syntax and decodes to the same pixels.
    rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    (fetched,) = [p for p in Workspace(ws).pacs_store.rglob(f"{rle.SOPInstanceUID}.dcm")]
    back = pydicom.dcmread(fetched)
    assert back.file_meta.TransferSyntaxUID == rle.file_meta.TransferSyntaxUID
    np.testing.assert_array_equal(back.pixel_array, rle.pixel_array)

    # Again: nothing new is fetched.
    again = fetch_studies(client, ws, studies)
    assert {r.status for r in again} == {"up-to-date"} and sum(r.fetched for r in again) == 0


class FlakySession(requests.Session):
    """A real HTTP session whose WADO-RS retrievals (a series, or an instance) fail as told: ``fail_at``
    (request numbers) raise a connection error, ``http_error_at`` answer 503."""

    def __init__(self, *, fail_at: set[int] = frozenset(), http_error_at: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        super().__init__()
        self.fail_at, self.http_error_at, self.count = fail_at, http_error_at, 0

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path = url.split("?")[0]
        retrieval = "/series/" in path and not path.endswith(("/metadata", "/instances", "/series"))
        if retrieval and method.upper() == "GET":
            self.count += 1
            if self.count in self.fail_at:
                raise requests.ConnectionError("connection reset by peer (injected)")
            if self.count in self.http_error_at:
                response = requests.Response()
                response.status_code, response.url = 503, url
                return response
        return super().request(method, url, *args, **kwargs)


def test_a_study_that_fails_half_way_is_not_kept_and_comes_next_time(pacs: tuple[Any, Path], tmp_path: Path) -> None:
    server, _ = pacs
    client = client_of(server)
    study = max(find_cohort(client, filters=parse_query("Modality=CT")),
                key=lambda uid: len(client.find_instances(uid)))
    ws = tmp_path / "ws"
    waits: list[float] = []
    series = {i.series_uid for i in client.find_instances(study)}
    # Every retrieval fails: after the retries the study is failed, and nothing of it is kept.
    broken = client_of(server, FlakySession(fail_at=set(range(1, 100))))
    result = fetch_study(broken, ws, study, retries=2, backoff=0.5, sleep=waits.append)
    assert result.status == "failed" and "cannot connect" in result.reason
    assert waits == [0.5, 1.0]  # exponential back-off between the attempts
    assert not (Workspace(ws).pacs_store / study).exists() and not (Workspace(ws).pacs_partial / study).exists()
    # Transient trouble (a reset, a 503) is retried and the study arrives whole, one request per series.
    flaky = client_of(server, FlakySession(fail_at={1}, http_error_at={2}))
    result = fetch_study(flaky, ws, study, retries=2, backoff=0.0)
    assert result.status == "fetched" and result.fetched == result.instances > 5
    assert result.attempts == 1 + len(series) + 2  # the instance listing, each series once, two retries
    assert len(list((Workspace(ws).pacs_store / study).rglob("*.dcm"))) == result.instances
    # One instance lost locally: only that one is asked for again, by itself.
    victim = next((Workspace(ws).pacs_store / study).rglob("*.dcm"))
    victim.unlink()
    counting = FlakySession()
    again = fetch_study(client_of(server, counting), ws, study)
    assert again.status == "fetched" and again.fetched == 1 and counting.count == 1 and victim.exists()
    # An unknown study is reported, not fatal.
    assert fetch_study(client, ws, "1.2.3.4.5").status == "failed"


def test_saliency_objects_go_back_to_the_pacs_and_read_again(pacs: tuple[Any, Path], tmp_path: Path) -> None:
    from imaging.dicom import plan_images, read_header, read_image
    from imaging.saliency_dicom import write_saliency_objects

    server, held = pacs
    client = client_of(server)
    studies = find_cohort(client, filters=parse_query("Modality=CT"))
    ws = tmp_path / "ws"
    fetch_study(client, ws, studies[0])
    headers = [read_header(p) for p in (Workspace(ws).pacs_store / studies[0]).rglob("*.dcm")]
    (plan,) = plan_images([h for h in headers if h.modality == "CT"])  # the study may hold its lesion's SEG too
    heat = np.zeros(plan.shape, np.float32)
    heat[10:14, 20:30, 20:30] = 0.8
    objects = write_saliency_objects(plan, heat, read_image(plan).array, tmp_path / "out", method="gradcam",
                                     probability=0.9, model_sha256="cd" * 32, task="lung-ct", window=None)
    before = int(server.statistics()["CountInstances"])
    with Catalog.open(ws) as catalog:
        stored = store_and_record(client, catalog, objects.paths)
        recorded = [(r["sop_instance_uid"], r["url"]) for r in catalog.stored_rows()]
    assert sorted(s[0] for s in stored) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in objects.paths)
    assert sorted(recorded) == sorted((s.sop_instance_uid, server.dicomweb) for s in stored)
    assert int(server.statistics()["CountInstances"]) == before + len(objects.paths)
    pm = pydicom.dcmread(objects.parametric_map)
    back = client.client.retrieve_instance(pm.StudyInstanceUID, pm.SeriesInstanceUID, pm.SOPInstanceUID)
    assert back.SOPClassUID == pm.SOPClassUID and back.StudyInstanceUID == plan.study_uid
    np.testing.assert_array_equal(back.pixel_array, pm.pixel_array)
    # Stored again (same UIDs): the PACS keeps one copy.
    with Catalog.open(ws) as catalog:
        store_and_record(client, catalog, objects.paths)
    assert int(server.statistics()["CountInstances"]) == before + len(objects.paths)


def test_credentials_come_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    assert credentials_from({}).kind == "none"
    basic = credentials_from({"ONCOFED_PACS_USER": "u", "ONCOFED_PACS_PASSWORD": "p w"})
    assert (basic.kind, basic.user, basic.secret) == ("basic", "u", "p w") and "p w" not in repr(basic)
    assert credentials_from({"ONCOFED_PACS_TOKEN": "t"}).kind == "bearer"
    with pytest.raises(DicomWebError, match="ONCOFED_PACS_PASSWORD is not"):
        credentials_from({"ONCOFED_PACS_USER": "u"})
    file = tmp_path / "pacs.cred"
    file.write_text("reader:secret:with:colons\n")
    file.chmod(0o644)
    with pytest.raises(DicomWebError, match="chmod 600"):
        credentials_from({}, file)
    file.chmod(0o600)
    assert credentials_from({}, file).secret == "secret:with:colons"
    file.write_text("Bearer abc\n")
    assert credentials_from({}, file).kind == "bearer"
    with pytest.raises(DicomWebError, match="does not exist"):
        credentials_from({}, tmp_path / "missing")
    with pytest.raises(DicomWebError, match="no credentials in the DICOMweb URL"):
        make_client("http://u:p@127.0.0.1:1/dicom-web", Credentials("none"))
    assert parse_query("Modality=CT&StudyDate=20200101-20201231") == {"ModalitiesInStudy": "CT",
                                                                      "StudyDate": "20200101-20201231"}
    with pytest.raises(PacsError, match="KEY=VALUE"):
        parse_query("Modality")


class _Answers:
    """Stands in for ``dicomweb_client``'s client: each search raises the next of ``errors``."""

    base_url = "http://pacs.invalid/dicom-web"

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def search_for_studies(self, **_kwargs: Any) -> list[dict[str, Any]]:
        self.calls += 1
        raise self.errors.pop(0)


def _http(code: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = code
    return requests.HTTPError(response=response)


def test_retries_stop_at_errors_that_will_not_pass() -> None:
    refusing = _Answers(_http(401), _http(401))
    with pytest.raises(DicomWebError, match=r"refused the credentials \(HTTP 401\)") as caught:
        with_retries(DicomWebPacs(refusing).verify, retries=3, backoff=0.0)
    assert not caught.value.transient and refusing.calls == 1  # a refusal is not retried
    busy = _Answers(_http(503), requests.ConnectionError("reset"), _http(503))
    waits: list[float] = []
    with pytest.raises(DicomWebError, match="HTTP 503") as caught:
        with_retries(DicomWebPacs(busy).verify, retries=2, backoff=0.5, sleep=waits.append)
    assert caught.value.transient and busy.calls == 3 and waits == [0.5, 1.0]


def test_the_dicomweb_client_is_a_pacs_source_and_store(pacs: tuple[Any, Path], tmp_path: Path) -> None:
    server, _ = pacs
    client: PacsSource = client_of(server)  # mypy checks the protocols here; the run checks the behaviour
    store: PacsStore = client_of(server)
    assert client.url == store.url == server.dicomweb
    client.verify()
    (study, *_) = client.find_studies({"ModalitiesInStudy": "CT"})
    listed = client.find_instances(study)
    assert listed and all(isinstance(i, Instance) and i.study_uid == study for i in listed)
    assert client.find_instances("1.2.3.4.5") == []
    series = listed[0].series_uid
    client.retrieve_series(study, series, folder=tmp_path / "series")
    assert {p.stem for p in (tmp_path / "series").iterdir()} == {i.sop_instance_uid for i in listed
                                                                 if i.series_uid == series}
    client.retrieve_instance(listed[0], folder=tmp_path / "one")
    assert [p.name for p in (tmp_path / "one").iterdir()] == [f"{listed[0].sop_instance_uid}.dcm"]
    with pytest.raises(DicomWebError, match="not found on the PACS") as caught:
        client.retrieve_instance(listed[0]._replace(sop_instance_uid="1.2.3.4.5"), folder=tmp_path / "none")
    assert not caught.value.transient
