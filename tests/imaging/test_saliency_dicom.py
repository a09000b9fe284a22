"""Saliency maps as DICOM: back on the source grid, valid for dciodvfy, readable by pydicom and dcmdump."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from imaging.catalog import Catalog
from imaging.dicom import ImagePlan, plan_images, read_header, read_image
from imaging.presets import PRESETS
from imaging.saliency_dicom import PM_SCALE, RESEARCH_NOTE, write_saliency_objects
from imaging.transforms import mask_to_network_grid, network_to_source


@pytest.fixture
def dicom_tools() -> None:
    from conftest import system_tool

    system_tool("dciodvfy")
    system_tool("dcmdump")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from consortium import make_workspaces

    root = tmp_path_factory.mktemp("saliency-dicom")
    ws = make_workspaces(root, sites=1, studies_per_task=6, seed=3, tasks=["lung-ct", "breast-mg", "prostate-mr"])
    return ws / "site-a", root / "data" / "site-a"


def lesion_items(site: tuple[Path, Path], task: str) -> list[tuple[ImagePlan, np.ndarray]]:
    ws, data = site
    records = {r["sop_instance_uid"] or r["series_instance_uid"]: r
               for r in json.loads((data / "lesions.json").read_text())}
    with Catalog.open(ws) as catalog:
        items = [i for i in catalog.items(task) if i.label == 1 and i.plan.key in records]
    return [(i.plan, np.load(data / records[i.plan.key]["mask"])["mask"].astype(bool)) for i in items]


@pytest.mark.parametrize("task", ["lung-ct", "breast-mg", "prostate-mr"])
def test_a_map_goes_back_onto_the_source_grid(site: tuple[Path, Path], task: str) -> None:
    """A lesion mask carried to the network grid and back lands where it was (both breast sides)."""
    sides = set()
    for plan, mask in lesion_items(site, task):
        on_network = mask_to_network_grid(mask, plan, PRESETS[task]).astype(np.float32)
        back = network_to_source(on_network, plan, PRESETS[task]) > 0.5
        assert back.shape == mask.shape
        dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
        assert dice > 0.85, (task, plan.key, dice)
        sides.add(plan.laterality)
    if task == "breast-mg":
        assert sides == {"L", "R"}  # one side is mirrored on the way in and must be mirrored back


def errors_of(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def check_objects(plan: ImagePlan, heat: np.ndarray, out: Path) -> None:
    image = read_image(plan).array
    objects = write_saliency_objects(plan, heat, image, out, method="gradcam", probability=0.73,
                                     model_sha256="ab" * 32, task="lung-ct", window=(-1000.0, 400.0), key_count=3)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in plan.paths]
    assert objects.key_images and all(p.exists() for p in objects.paths)
    for path in objects.paths:
        assert not errors_of(path), (path.name, errors_of(path))
        assert subprocess.run(["dcmdump", str(path)], capture_output=True, timeout=60).returncode == 0
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == plan.study_uid and ds.PatientID == sources[0].PatientID
        assert ds.SeriesDescription.startswith("RESEARCH")
    if plan.spatial_dims == 3:
        pm = pydicom.dcmread(objects.parametric_map)
        assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
        assert pm.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        assert pm.ContentQualification == "RESEARCH" and pm.ContentDescription == RESEARCH_NOTE[:64]
        assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == plan.series_uid
        assert int(pm.NumberOfFrames) == len(plan.slices)
        # Each frame sits at a source slice's position and holds that slice's map (through the mapping).
        frames = pm.pixel_array.astype(np.float32)
        slope = float(pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueSlope)
        assert slope == pytest.approx(1 / PM_SCALE)
        at = {tuple(round(float(v), 2) for v in src.ImagePositionPatient): k for k, src in enumerate(sources)}
        for frame, pixels in zip(pm.PerFrameFunctionalGroupsSequence, frames, strict=True):
            k = at[tuple(round(float(v), 2) for v in frame.PlanePositionSequence[0].ImagePositionPatient)]
            np.testing.assert_allclose(pixels * slope, heat[k], atol=1 / PM_SCALE)
    else:
        assert objects.parametric_map is None
    for path in objects.key_images:
        key = pydicom.dcmread(path)
        assert key.PhotometricInterpretation == "RGB" and key.pixel_array.shape == (*plan.shape[-2:], 3)
        assert key.SourceImageSequence[0].ReferencedSOPInstanceUID in {s.SOPInstanceUID for s in sources}
        assert RESEARCH_NOTE in key.ImageComments
    # The same map written again gives the same objects (a PACS replaces rather than duplicates them).
    again = write_saliency_objects(plan, heat, image, out / "again", method="gradcam", probability=0.73,
                                   model_sha256="ab" * 32, task="lung-ct", window=None, key_count=3)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in again.paths] == \
        [pydicom.dcmread(p).SOPInstanceUID for p in objects.paths]


@pytest.mark.parametrize("task", ["lung-ct", "breast-mg", "prostate-mr"])
def test_saliency_objects_of_synthetic_studies_are_valid_dicom(site: tuple[Path, Path], task: str, tmp_path: Path,
                                                               dicom_tools: None) -> None:
    plan, mask = lesion_items(site, task)[0]
    check_objects(plan, mask.astype(np.float32) * 0.9, tmp_path)


def vendor_series(name: str, slices: int, folder: Path) -> ImagePlan:
    """A series of a real vendor file (pydicom's test data) repeated along its normal, new UIDs per slice."""
    source = pydicom.dcmread(get_testdata_file(name))
    normal = np.cross(np.array(source.ImageOrientationPatient[:3], float),
                      np.array(source.ImageOrientationPatient[3:], float))
    series, origin = generate_uid(), np.array(source.ImagePositionPatient, float)
    step = float(source.get("SliceThickness") or 1.0)
    folder.mkdir()
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + normal * step * k]
        ds.save_as(folder / f"{k:03d}.dcm")
    (plan,) = plan_images([read_header(p) for p in sorted(folder.glob("*.dcm"))])
    return plan


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_saliency_objects_of_vendor_files_are_valid_dicom(name: str, tmp_path: Path, dicom_tools: None) -> None:
    """Headers this project did not write (GE CT, MR with private tags) go through the same writers."""
    plan = vendor_series(name, 16, tmp_path / "series")
    rng = np.random.default_rng(0)
    heat = np.zeros(plan.shape, np.float32)
    heat[6:9, 20:40, 30:50] = rng.uniform(0.5, 1.0, (3, 20, 20))
    check_objects(plan, heat, tmp_path / "out")


def test_explain_writes_dicom_next_to_the_maps(site: tuple[Path, Path], tmp_path: Path) -> None:
    """The explain run maps the network-grid map back and writes its DICOM objects."""
    import torch

    from fl_client.explain import explain
    from models.config import from_flat
    from models.nets import build_model
    from models.weights import state_arrays

    ws, _ = site
    config = from_flat({"task": "prostate-mr", "model-width": 8})
    model = build_model(config.model)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save({"arrays": {k: torch.from_numpy(v) for k, v in state_arrays(model).items()},
                "run_config": {"task": "prostate-mr", "model-width": 8}, "round": 0}, checkpoint)
    doc = explain(ws, checkpoint, tmp_path / "out", split=None, study=lesion_items(site, "prostate-mr")[0][0].study_uid,
                  dicom=True)
    (entry,) = doc["images"]
    assert doc["methods"] == ["hirescam"]  # prostate's own map, asked for none
    files = [tmp_path / "out" / p for p in entry["maps"]["hirescam"]["dicom"]]
    assert files[0].name.endswith("-pm.dcm") and len(files) == 6
    pm = pydicom.dcmread(files[0])
    assert pm.SeriesInstanceUID == entry["maps"]["hirescam"]["dicom_series"][0]
    assert int(pm.NumberOfFrames) == len(lesion_items(site, "prostate-mr")[0][0].slices)


def test_the_source_tree_version_is_the_installed_one() -> None:
    """The DICOM objects name the software that made them: the source tree's fallback must not drift from the
    package's own version (pyproject.toml)."""
    import importlib.metadata
    import tomllib

    from imaging.saliency_dicom import SOFTWARE_VERSION

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert SOFTWARE_VERSION == project["version"] == importlib.metadata.version("oncofed")
