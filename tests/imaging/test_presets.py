"""Which task a series is for: its modality, then its region (BodyPartExamined, else the series description)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_series

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.presets import tasks_for_series
from imaging.summary import site_status


@pytest.mark.parametrize(("modality", "body_part", "description", "tasks"), [
    ("CT", "CHEST", "", ("lung-ct",)),
    ("CT", "ABDOMEN", "", ("colorectal-ct",)),
    ("CT", "chest_to_pelvis", "", ("lung-ct", "colorectal-ct")),
    ("CT", "Thorax CT", "", ("lung-ct",)),
    ("CT", "HEAD", "", ()),  # a region no task reads
    ("CT", "", "CT ABD/PELVIS W CONTRAST", ("colorectal-ct",)),
    ("CT", "", "Low-dose lung screening", ("lung-ct",)),
    ("CT", "", "", ("lung-ct", "colorectal-ct")),  # no region said: labels decide
    ("MR", "PELVIS", "", ("prostate-mr",)),
    ("MG", "", "", ("breast-mg",)),
    ("US", "CHEST", "", ()),
])
def test_the_region_decides_the_task(modality: str, body_part: str, description: str, tasks: tuple[str, ...]) -> None:
    assert tasks_for_series(modality, body_part, description) == tasks


def _tag(paths: list[Path], **values: str) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def test_an_abdominal_ct_is_not_in_the_lung_worklist(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    chest, _, _ = write_series(src / "chest", n=20, patient_id="P1", seed=1)
    abdomen, _, _ = write_series(src / "abdomen", n=20, patient_id="P2", seed=2)
    head, _, _ = write_series(src / "head", n=20, patient_id="P3", seed=3)
    _tag(chest, BodyPartExamined="CHEST")
    _tag(abdomen, BodyPartExamined="", SeriesDescription="ABD PELVIS 5mm")
    _tag(head, BodyPartExamined="HEAD")
    with Catalog.open(tmp_path / "ws") as catalog:
        ingest_folder(catalog, src)
        lung = {i.study_uid for i in catalog.items("lung-ct", labelled_only=False)}
        colorectal = {i.study_uid for i in catalog.items("colorectal-ct", labelled_only=False)}
        studies = {r["patient_id"]: r["study_uid"] for r in catalog.db.execute("SELECT * FROM studies")}
        status = site_status(catalog)
    assert lung == {studies["P1"]} and colorectal == {studies["P2"]}
    assert status["tasks"]["lung-ct"]["studies_with_usable_images"] == 1
    assert status["tasks"]["colorectal-ct"]["studies_with_usable_images"] == 1
