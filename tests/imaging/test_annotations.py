"""Lesion annotations (imaging/annotations.py and their ingest): the generator's SEG objects read back voxel for voxel,
SEGs on other software's geometry and a hand-written RT Structure Set land on the right voxels, mismatches are
rejected with their reason while the rest ingests, the catalog's items of image and segmentation tasks, and an
ingest that is idempotent and survives kill -9."""

from __future__ import annotations

import copy
import csv
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imaging.annotations import read_annotation, read_annotation_ref
from imaging.catalog import Catalog
from imaging.dicom import plan_images, read_header, read_image
from imaging.errors import DicomError, Reason
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.synth import ALL_TASKS, generate_consortium

CATEGORY = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure")
NEOPLASM = hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")


def _is_seg(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except pydicom.errors.InvalidDicomError:
        return False  # the labels, lesion records and masks next to the DICOM folder
    return str(ds.get("Modality", "")) == "SEG"


def _segs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_seg(p))


def _truth(site: Path) -> dict[str, np.ndarray]:
    """The generator's masks by image key (the union of each image's lesions)."""
    out: dict[str, np.ndarray] = {}
    for record in json.loads((site / "lesions.json").read_text()):
        key = record["sop_instance_uid"] or record["series_instance_uid"]
        mask = np.load(site / record["mask"])["mask"].astype(bool)
        out[key] = out[key] | mask if key in out else mask
    return out


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sites (classic, oblique and enhanced MR; plain, MONOCHROME1/RLE and JPEG 2000 mammograms), every task."""
    out = tmp_path_factory.mktemp("annotated")
    generate_consortium(out, sites=3, studies_per_task=4, seed=21)
    return out


@pytest.fixture(scope="module")
def workspaces(consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("annotated-ws")
    out = {}
    for site in sorted(p for p in consortium.iterdir() if p.is_dir()):
        with Catalog.open(root / site.name) as catalog:
            ingest_folder(catalog, site / "dicom")
            load_labels(catalog, site / "labels.csv")
        out[site.name] = root / site.name
    return out


def test_generator_segs_read_back_voxel_for_voxel_for_every_task(consortium: Path,
                                                                 workspaces: dict[str, Path]) -> None:
    tasks_seen: set[str] = set()
    for name, ws in workspaces.items():
        truth = _truth(consortium / name)
        with Catalog.open(ws, create=False) as catalog:
            rows = catalog.annotation_rows()
            assert rows and {r["status"] for r in rows} == {"ok"}, [dict(r) for r in rows if r["status"] != "ok"]
            assert {r["image_key"] for r in rows} == set(truth)  # one SEG per image with a lesion, each matched
            plans = {r["image_key"]: r["plan"] for r in catalog.db.execute("SELECT image_key, plan FROM images")}
            for row in rows:
                from imaging.catalog import plan_from_json

                plan = plan_from_json(plans[row["image_key"]])
                mask = read_annotation(row["path"], plan).mask  # straight from the file, on the reader's grid
                assert mask.shape == read_image(plan).array.shape
                np.testing.assert_array_equal(mask, truth[row["image_key"]], err_msg=f"{name} {row['path']}")
                stored = np.load(catalog.mask_path(row["image_key"]))["mask"]
                assert stored.dtype == np.uint8
                np.testing.assert_array_equal(stored.astype(bool), truth[row["image_key"]])
                assert row["voxels"] == int(truth[row["image_key"]].sum()) and row["lesions"] >= 1
            for task in ALL_TASKS:
                if any(i.mask is not None for i in catalog.items(f"{task}-seg")):
                    tasks_seen.add(task)
    assert tasks_seen == set(ALL_TASKS)


def test_generator_segs_pass_the_dicom_validator(consortium: Path) -> None:
    """A CT, a classic MR, an enhanced MR and a mammogram SEG: dciodvfy reports no errors (warnings allowed)."""
    from conftest import system_tool

    system_tool("dciodvfy")
    checked: dict[str, Path] = {}
    for path in _segs(consortium):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source_class = str(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID)
        checked.setdefault(source_class, path)
    assert len(checked) == 4, sorted(checked)  # CT, MR, enhanced MR, MG for presentation
    for path in checked.values():
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"


def test_segmentation_items_are_masked_positives_and_csv_negatives(consortium: Path,
                                                                   workspaces: dict[str, Path]) -> None:
    truth = _truth(consortium / "site-a")
    with Catalog.open(workspaces["site-a"], create=False) as catalog:
        images = catalog.items("lung-ct")
        items = catalog.items("lung-ct-seg")
        csv_labels = dict(catalog.db.execute("SELECT study_uid, label FROM labels WHERE task='lung-ct'").fetchall())
    assert [(i.study_uid, i.plan.key, i.split) for i in items] == [(i.study_uid, i.plan.key, i.split) for i in images]
    positives = [i for i in items if i.label == 1]
    negatives = [i for i in items if i.label == 0]
    assert positives and negatives and len(positives) + len(negatives) == len(items)
    for item in positives:
        assert item.mask is not None and item.mask.is_absolute() and csv_labels[item.study_uid] == 1
        np.testing.assert_array_equal(np.load(item.mask)["mask"].astype(bool), truth[item.plan.key])
        assert item.mask.name != f"{item.plan.key}.npz" and item.plan.key not in str(item.mask)  # no UID in the name
    for item in negatives:
        assert item.mask is None and csv_labels[item.study_uid] == 0
    assert all(i.mask is None for i in images)  # image tasks carry no mask


def test_labels_come_from_annotations_without_a_csv_and_a_csv_label_wins(consortium: Path, tmp_path: Path) -> None:
    site = consortium / "site-a"
    ws = tmp_path / "ws"
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, site / "dicom")
        derived = catalog.items("lung-ct")
        assert derived and {i.label for i in derived} == {1}  # only the positives are annotated
        assert all(i.split in ("train", "val", "test") for i in derived)  # and given a split at ingest
        assert {i.study_uid for i in catalog.items("lung-ct-seg")} == {i.study_uid for i in derived}
        assert len(catalog.items("lung-ct", labelled_only=False)) > len(derived)  # the negatives, unknown
        assert {i.label for i in catalog.items("lung-ct-seg", labelled_only=False)} == {-1, 1}
        # The CSV labels the rest, and wins where it says otherwise.
        overruled = derived[0].study_uid
        rows = [r for r in csv.reader((site / "labels.csv").open()) if len(r) == 3]
        rows = [[s, t, "0" if s == overruled and t == "lung-ct" else lbl] for s, t, lbl in rows]
        manifest = tmp_path / "labels.csv"
        with manifest.open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
        load_labels(catalog, manifest)
        labels = {i.study_uid: i.label for i in catalog.items("lung-ct")}
        assert labels[overruled] == 0 and set(labels.values()) == {0, 1}
        # The segmentation task keeps the mask: it is the truth of a segmentation sample.
        assert {i.study_uid: i.label for i in catalog.items("lung-ct-seg")}[overruled] == 1


def _series_from(name: str, folder: Path, n: int) -> list[Dataset]:
    """A volume of ``n`` slices copied from one of pydicom's test files, with new UIDs and positions along its
    normal, numbered against their order; the files are written and their datasets returned in position order."""
    src = pydicom.dcmread(str(get_testdata_file(name)))
    orientation = np.array(src.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    step = float(src.get("SpacingBetweenSlices") or src.SliceThickness)
    series_uid = generate_uid(entropy_srcs=[name, "series"])
    out = []
    for k in range(n):
        ds = copy.deepcopy(src)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, "slice", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.array(src.ImagePositionPatient, float)
                                   + k * step * normal]
        ds.InstanceNumber = n - k
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{(7 * k) % n:03d}.dcm", enforce_file_format=True)  # names in another order
        out.append(ds)
    return out


def _seg(sources: list[Dataset], mask: np.ndarray, *, kind: str = "BINARY", algorithm: str = "MANUAL",
         **kwargs: object) -> hd.seg.Segmentation:
    identification = None
    if algorithm == "AUTOMATIC":
        identification = hd.AlgorithmIdentificationSequence(
            name="a model", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"))
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=CATEGORY,
        segmented_property_type=NEOPLASM, algorithm_type=algorithm, algorithm_identification=identification)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=kind, segment_descriptions=[description],
        series_instance_uid=generate_uid(), series_number=300, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        **kwargs)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_a_seg_on_other_softwares_geometry_reads_back_voxel_for_voxel(name: str, tmp_path: Path) -> None:
    sources = _series_from(name, tmp_path / "series", 5)
    (plan,) = plan_images([read_header(p) for p in (tmp_path / "series").iterdir()])
    rows, cols = plan.shape[1:]
    mask = np.zeros(plan.shape, bool)
    mask[1, 10:20, 5:15] = True
    mask[2, 12:22, 7:17] = True
    mask[3, rows - 4:, cols - 3:] = True  # at the edge
    order = [3, 0, 4, 1, 2]  # highdicom is given the slices in another order than the reader's
    seg = _seg([sources[k] for k in order], mask[order].astype(np.uint8))
    seg.save_as(tmp_path / "seg.dcm")
    annotation = read_annotation(tmp_path / "seg.dcm", plan)
    assert annotation.ref.referenced_series == (plan.series_uid,) and annotation.segments == ("lesion",)
    np.testing.assert_array_equal(annotation.mask, mask)
    # FRACTIONAL: thresholded at half the maximum.
    fractions = np.zeros(plan.shape, np.float32)
    fractions[2, 10:20, 10:20] = 0.7
    fractions[2, 10:20, 20:30] = 0.3
    _seg(sources, fractions, kind="FRACTIONAL").save_as(tmp_path / "fractional.dcm")
    np.testing.assert_array_equal(read_annotation(tmp_path / "fractional.dcm", plan).mask, fractions >= 0.5)
    # A model's prediction is not a reference annotation.
    _seg(sources, mask.astype(np.uint8), algorithm="AUTOMATIC").save_as(tmp_path / "predicted.dcm")
    with pytest.raises(DicomError) as err:
        read_annotation(tmp_path / "predicted.dcm", plan)
    assert err.value.reason is Reason.ANNOTATION_AUTOMATIC
    # A SEG without segments marks nothing.
    empty = pydicom.dcmread(tmp_path / "seg.dcm")
    empty.SegmentSequence = DicomSequence([])
    empty.save_as(tmp_path / "empty.dcm")
    with pytest.raises(DicomError, match="no segments") as err:
        read_annotation(tmp_path / "empty.dcm", plan)
    assert err.value.reason is Reason.ANNOTATION_UNREADABLE and err.value.path == tmp_path / "empty.dcm"


def _rtstruct(sources: list[Dataset], rois: list[tuple[str, str, list[tuple[int, list[tuple[float, float]], bool]]]]
              ) -> Dataset:
    """An RT Structure Set on ``sources`` (in position order): per ROI ``(name, interpreted type, contours)``, each
    contour ``(slice, [(row, col), ...], reference the slice?)`` at fractional pixel positions."""
    first = sources[0]
    row_dir = np.array(first.ImageOrientationPatient[:3], float)
    col_dir = np.array(first.ImageOrientationPatient[3:], float)
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID, ds.PatientID = first.StudyInstanceUID, first.PatientID
    ds.SeriesInstanceUID = generate_uid()
    ds.StructureSetLabel = "lesions"

    def item(**values: object) -> Dataset:
        out = Dataset()
        for key, value in values.items():
            setattr(out, key, value)
        return out

    images = [item(ReferencedSOPClassUID=s.SOPClassUID, ReferencedSOPInstanceUID=s.SOPInstanceUID) for s in sources]
    ds.ReferencedFrameOfReferenceSequence = [item(
        FrameOfReferenceUID=first.FrameOfReferenceUID,
        RTReferencedStudySequence=[item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1", ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=[item(SeriesInstanceUID=first.SeriesInstanceUID,
                                             ContourImageSequence=images)])])]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, kind, contours) in enumerate(rois, start=1):
        ds.StructureSetROISequence.append(item(ROINumber=number, ROIName=name,
                                               ReferencedFrameOfReferenceUID=first.FrameOfReferenceUID,
                                               ROIGenerationAlgorithm="MANUAL"))
        ds.RTROIObservationsSequence.append(item(ObservationNumber=number, ReferencedROINumber=number,
                                                 RTROIInterpretedType=kind, ROIInterpreter=""))
        sequence = []
        for k, polygon, referenced in contours:
            origin = np.array(sources[k].ImagePositionPatient, float)
            points = [origin + c * col_sp * row_dir + r * row_sp * col_dir for r, c in polygon]
            contour = item(ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(points),
                           ContourData=[round(float(v), 4) for p in points for v in p])
            if referenced:
                contour.ContourImageSequence = [images[k]]
            sequence.append(contour)
        ds.ROIContourSequence.append(item(ReferencedROINumber=number, ROIDisplayColor=[255, 0, 0],
                                          ContourSequence=sequence))
    return ds


def test_an_rtstruct_fills_its_contours_on_the_slices_they_lie_on(tmp_path: Path) -> None:
    sources = _series_from("CT_small.dcm", tmp_path / "series", 5)
    (plan,) = plan_images([read_header(p) for p in (tmp_path / "series").iterdir()])

    def square(r0: float, c0: float, r1: float, c1: float) -> list[tuple[float, float]]:
        return [(r0, c0), (r0, c1), (r1, c1), (r1, c0)]

    rois = [
        ("Tumour", "GTV", [(1, square(10, 30, 20, 40), True),  # matched by its reference
                           (2, square(10, 30, 20, 40), False),  # by its position only
                           (2, square(13, 33, 17, 37), False),  # a hole in it (even-odd)
                           (3, [(50, 50), (50, 60), (60, 50)], False)]),  # a triangle
        ("BODY", "EXTERNAL", [(k, square(0, 0, 127, 127), False) for k in range(5)]),  # not a lesion: left out
    ]
    _rtstruct(sources, rois).save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    expected = np.zeros(plan.shape, bool)
    expected[1, 10:21, 30:41] = True
    expected[2, 10:21, 30:41] = True
    expected[2, 13:18, 33:38] = False  # the hole, its edge too (on both contours: filled twice, even: out)
    rr, cc = np.mgrid[:128, :128]
    expected[3] = (rr >= 50) & (cc >= 50) & (rr + cc <= 110)
    annotation = read_annotation(tmp_path / "rt.dcm", plan)
    assert annotation.segments == ("Tumour",) and annotation.ref.kind == "RTSTRUCT"
    np.testing.assert_array_equal(annotation.mask, expected)
    # A contour off every slice plane, and one that references another slice than it lies on.
    off = _rtstruct(sources, [("GTV", "GTV", [(1, square(10, 30, 20, 40), False)])])
    data = off.ROIContourSequence[0].ContourSequence[0].ContourData
    off.ROIContourSequence[0].ContourSequence[0].ContourData = [v + (1.5 if i % 3 == 2 else 0.0)
                                                                for i, v in enumerate(data)]
    off.save_as(tmp_path / "off.dcm", enforce_file_format=True)
    crossed = _rtstruct(sources, [("GTV", "GTV", [(1, square(10, 30, 20, 40), True)])])
    crossed.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0].ReferencedSOPInstanceUID = \
        sources[3].SOPInstanceUID
    crossed.save_as(tmp_path / "crossed.dcm", enforce_file_format=True)
    for name, words in (("off.dcm", "along the slice normal"), ("crossed.dcm", "references the instance of slice 4")):
        with pytest.raises(DicomError, match=words) as err:
            read_annotation(tmp_path / name, plan)
        assert err.value.reason is Reason.ANNOTATION_GEOMETRY


def _site_with_bad_annotations(consortium: Path, folder: Path) -> dict[str, Reason]:
    """Three SEGs that do not fit, next to site a's files: another matrix size, shifted by 3 slices, and one that
    references a series the site does not hold. Returns the expected reason by SOP instance UID."""
    site = consortium / "site-a"
    ct_seg = next(p for p in _segs(site / "dicom") if pydicom.dcmread(p).ReferencedSeriesSequence[0]
                  .ReferencedInstanceSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2")
    seg = pydicom.dcmread(ct_seg)
    series_uid = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    headers = [read_header(p) for p in (site / "dicom").rglob("*") if p.is_file() and not _is_seg(p)]
    (plan,) = plan_images([h for h in headers if h.series_uid == series_uid])
    sources = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in plan.paths),
                     key=lambda d: [s.path for s in plan.slices].index(Path(d.filename)))
    folder.mkdir(parents=True)
    expected: dict[str, Reason] = {}
    # Drawn on a copy resampled to half the matrix.
    small = []
    for src in sources:
        ds = copy.deepcopy(src)
        ds.Rows, ds.Columns = src.Rows // 2, src.Columns // 2
        ds.PixelSpacing = [float(v) * 2 for v in src.PixelSpacing]
        small.append(ds)
    mask = np.zeros((len(small), small[0].Rows, small[0].Columns), np.uint8)
    mask[len(small) // 2, 5:9, 5:9] = 1
    resized = _seg(small, mask)
    resized.save_as(folder / "resized.dcm")
    expected[resized.SOPInstanceUID] = Reason.ANNOTATION_GEOMETRY
    # The frames moved by three slices along the normal; their references still name the old slices.
    shifted = copy.deepcopy(seg)
    normal = np.cross(np.array(plan.orientation[:3]), np.array(plan.orientation[3:]))
    for group in shifted.PerFrameFunctionalGroupsSequence:
        position = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float) + 3 * plan.spacing[0] * normal
        group.PlanePositionSequence[0].ImagePositionPatient = [round(float(v), 4) for v in position]
    shifted.SOPInstanceUID = shifted.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    shifted.save_as(folder / "shifted.dcm")
    expected[shifted.SOPInstanceUID] = Reason.ANNOTATION_GEOMETRY
    # A series this site does not hold.
    stray = copy.deepcopy(seg)
    stray.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()
    for item in stray.ReferencedSeriesSequence[0].ReferencedInstanceSequence:
        item.ReferencedSOPInstanceUID = generate_uid()
    for group in stray.PerFrameFunctionalGroupsSequence:
        for derivation in group.DerivationImageSequence:
            for src in derivation.SourceImageSequence:
                src.ReferencedSOPInstanceUID = generate_uid()
    stray.SOPInstanceUID = stray.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    stray.save_as(folder / "stray.dcm")
    expected[stray.SOPInstanceUID] = Reason.ANNOTATION_UNREFERENCED
    return expected


def test_mismatched_annotations_are_rejected_and_the_rest_ingests(consortium: Path, tmp_path: Path) -> None:
    from imaging.summary import series_listing, site_status

    expected = _site_with_bad_annotations(consortium, tmp_path / "bad")
    truth = _truth(consortium / "site-a")
    with Catalog.open(tmp_path / "ws") as catalog:
        images = ingest_folder(catalog, consortium / "site-a" / "dicom")
        bad = ingest_folder(catalog, tmp_path / "bad")
        rows = {r["sop_instance_uid"]: r for r in catalog.annotation_rows()}
        for sop, reason in expected.items():
            assert (rows[sop]["status"], rows[sop]["reason"]) == ("rejected", reason), dict(rows[sop])
            assert rows[sop]["path"].startswith(str((tmp_path / "bad").resolve()))
        assert "not in the catalog" in rows[next(s for s, r in expected.items()
                                                 if r is Reason.ANNOTATION_UNREFERENCED)]["message"]
        good = [r for sop, r in rows.items() if sop not in expected]
        assert len(good) == len(truth) and {r["status"] for r in good} == {"ok"}
        for key, mask in truth.items():  # the rejected ones changed no mask
            np.testing.assert_array_equal(np.load(catalog.mask_path(key))["mask"].astype(bool), mask)
        assert catalog.db.execute("SELECT COUNT(*) FROM series WHERE status != 'ok'").fetchone()[0] == 0
        status = site_status(catalog)
        listing = series_listing(catalog)
    assert images.annotations_ok == len(truth) and images.annotations_rejected == 0
    assert (bad.annotations_ok, bad.annotations_rejected) == (0, 3)
    assert bad.rejected == {"annotation:annotation-geometry": 2, "annotation:annotation-unreferenced": 1}
    assert status["annotations"] == {"ok": len(truth), "rejected": 3}
    assert {"level": "annotation", "reason": "annotation-geometry", "count": 2} in status["rejects"]
    assert status["tasks"]["lung-ct-seg"]["masked_samples"] > 0
    assert sum(a["status"] == "rejected" for a in listing["annotations"]) == 3


def test_an_annotation_before_its_series_is_matched_when_the_series_arrives(consortium: Path,
                                                                            tmp_path: Path) -> None:
    site = consortium / "site-a"
    segs, images = tmp_path / "segs", tmp_path / "images"
    shutil.copytree(site / "dicom", images, ignore=lambda d, names: [n for n in names if (Path(d) / n).is_file()
                                                                      and _is_seg(Path(d) / n)])
    for i, path in enumerate(_segs(site / "dicom")):
        segs.mkdir(exist_ok=True)
        shutil.copy(path, segs / f"{i:03d}.dcm")
    with Catalog.open(tmp_path / "ws") as catalog:
        first = ingest_folder(catalog, segs)
        assert first.annotations_ok == 0 and first.rejected == {"annotation:annotation-unreferenced":
                                                                first.annotations_rejected}
        assert catalog.db.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 0
        second = ingest_folder(catalog, images)  # another folder, a later run: the series arrive
        rows = catalog.annotation_rows()
        assert {r["status"] for r in rows} == {"ok"} and len(rows) == first.annotations_rejected
        assert second.annotations_checked == len(rows)
        for key, mask in _truth(site).items():
            np.testing.assert_array_equal(np.load(catalog.mask_path(key))["mask"].astype(bool), mask)
        # The annotations' own folder is up to date: nothing is read again.
        again = ingest_folder(catalog, segs)
        assert (again.files_read, again.annotations_checked, again.annotations_ok) == (0, 0, len(rows))


def _annotation_state(ws: Path) -> tuple[list[tuple], dict[str, bytes]]:
    with Catalog.open(ws) as catalog:
        rows = [tuple(r) for r in catalog.db.execute("SELECT * FROM annotations ORDER BY sop_instance_uid")]
        pending = catalog.db.execute("SELECT COUNT(*) FROM pending_annotations").fetchone()[0]
        splits = [tuple(r) for r in catalog.db.execute(  # by PatientID: pseudonyms are salted per catalog
            "SELECT DISTINCT st.patient_id, sp.split FROM splits sp JOIN studies st "
            "ON st.patient_pseudonym = sp.patient_pseudonym ORDER BY 1")]
    assert pending == 0
    masks = {p.name: np.load(p)["mask"].tobytes() for p in sorted((ws / "annotations").iterdir())}
    return rows + splits, masks


def test_reingest_is_idempotent(consortium: Path, workspaces: dict[str, Path]) -> None:
    ws = workspaces["site-c"]
    before = _annotation_state(ws)
    times = {p.name: p.stat().st_mtime_ns for p in (ws / "annotations").iterdir()}
    with Catalog.open(ws) as catalog:
        ok = sum(r["status"] == "ok" for r in catalog.annotation_rows())
        again = ingest_folder(catalog, consortium / "site-c" / "dicom")
    assert (again.files_read, again.series_checked, again.annotations_checked) == (0, 0, 0)
    assert again.annotations_ok == ok == len(before[1])  # one SEG per annotated image, one mask file each
    assert _annotation_state(ws) == before
    assert {p.name: p.stat().st_mtime_ns for p in (ws / "annotations").iterdir()} == times  # nothing rewritten
    # The masks are rebuilt by the next ingest when their folder is deleted.
    shutil.rmtree(ws / "annotations")
    with Catalog.open(ws) as catalog:
        rebuilt = ingest_folder(catalog, consortium / "site-c" / "dicom")
    assert rebuilt.annotations_checked == ok and _annotation_state(ws) == before


CHILD = textwrap.dedent("""
    import sys, time
    from imaging.catalog import Catalog
    from imaging.ingest import ingest_folder
    ws, src, phase, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def tick(p, done, total):
        if p == phase and done == at:
            print("stopped", flush=True)
            time.sleep(600)
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, src, progress=tick)
""")


@pytest.mark.parametrize(("phase", "at"), [("annotations", 0), ("annotations", 2)])
def test_kill_9_while_matching_annotations_then_a_rerun_ends_as_if_uninterrupted(
        consortium: Path, workspaces: dict[str, Path], tmp_path: Path, phase: str, at: int) -> None:
    src = consortium / "site-a" / "dicom"
    reference = _annotation_state(workspaces["site-a"])
    ws = tmp_path / "ws"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ws), str(src), phase, str(at)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "stopped":
                break
        else:
            pytest.fail(f"the ingest never reached {phase} {at}")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, src)
        load_labels(catalog, consortium / "site-a" / "labels.csv")  # as the reference workspace was
    assert _annotation_state(ws) == reference


def test_read_annotation_ref_names_what_it_references(consortium: Path) -> None:
    path = _segs(consortium / "site-b" / "dicom")[0]
    ref = read_annotation_ref(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ref.kind == "SEG" and ref.sop_instance_uid == ds.SOPInstanceUID and ref.series_uid == ds.SeriesInstanceUID
    assert ref.referenced_series == (ds.ReferencedSeriesSequence[0].SeriesInstanceUID,)
    assert set(ref.referenced_instances) == {i.ReferencedSOPInstanceUID
                                             for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    with pytest.raises(DicomError) as err:
        read_annotation_ref(str(get_testdata_file("CT_small.dcm")))
    assert err.value.reason is Reason.ANNOTATION_UNREADABLE and "not an annotation" in err.value.message
