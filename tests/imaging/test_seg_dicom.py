"""Predicted lesion masks as DICOM SEG: on the source grid voxel for voxel, valid for dciodvfy, stable UIDs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from imaging.catalog import Catalog
from imaging.dicom import ImagePlan, affine_lps, plan_images, read_header
from imaging.presets import get_preset
from imaging.saliency_dicom import RESEARCH_NOTE
from imaging.seg_dicom import SegDicomError, predicted_mask, write_lesion_segmentation
from imaging.transforms import mask_to_network_grid, network_to_source

SHA = "5e" * 32


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from consortium import make_workspaces

    root = tmp_path_factory.mktemp("seg-dicom")
    ws = make_workspaces(root, sites=1, studies_per_task=4, seed=11, tasks=["lung-ct", "breast-mg", "prostate-mr"])
    return ws / "site-a", root / "data" / "site-a"


def lesion_images(site: tuple[Path, Path], task: str) -> list[tuple[ImagePlan, np.ndarray]]:
    """The task's images with a lesion, and the generator's mask of it on the DICOM grid."""
    ws, data = site
    records = {r["sop_instance_uid"] or r["series_instance_uid"]: r
               for r in json.loads((data / "lesions.json").read_text())}
    with Catalog.open(ws) as catalog:
        items = [i for i in catalog.items(task) if i.plan.key in records]
    assert items, f"no {task} lesion in the synthetic site"
    return [(i.plan, np.load(data / records[i.plan.key]["mask"])["mask"].astype(bool)) for i in items]


def dciodvfy_errors(path: Path) -> list[str]:
    from conftest import system_tool

    out = subprocess.run([system_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def source_uids(plan: ImagePlan) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in plan.paths]


def on_plan_grid(volume: hd.Volume, plan: ImagePlan) -> np.ndarray:
    """A highdicom volume's mask put on the plan's ``(slices, rows, cols)`` grid through both affines."""
    to_plan = np.linalg.inv(affine_lps(plan)) @ volume.affine  # (i, j, k) of the volume -> (col, row, slice)
    assert np.allclose(to_plan[:3, :3], to_plan[:3, :3].round(), atol=1e-3), "the grids do not coincide"
    out = np.zeros(plan.shape, bool)
    crs = (to_plan[:3, :3] @ np.argwhere(volume.array > 0).T + to_plan[:3, 3:4]).round().astype(int)
    out[crs[2], crs[1], crs[0]] = True
    return out


@pytest.mark.parametrize("task", ["lung-ct", "prostate-mr", "breast-mg"])
def test_predicted_masks_are_the_thresholded_map_on_the_source_grid(site: tuple[Path, Path], task: str) -> None:
    preset = get_preset(task)
    rng = np.random.default_rng(0)
    for plan, mask in lesion_images(site, task):
        network = mask_to_network_grid(mask, plan, preset).astype(np.float32)
        noisy = np.clip(0.8 * network + 0.3 * rng.random(network.shape, dtype=np.float32), 0, 1)
        fast = predicted_mask(noisy, plan, preset)
        assert fast.shape == plan.shape and fast.any()
        assert np.array_equal(fast, network_to_source(noisy, plan, preset) > 0.5), plan.key
        assert not predicted_mask(np.zeros_like(noisy), plan, preset).any()
    with pytest.raises(SegDicomError, match="threshold"):
        predicted_mask(noisy, plan, preset, threshold=-0.1)


@pytest.mark.parametrize("task", ["lung-ct", "prostate-mr", "breast-mg"])
def test_a_mask_reads_back_voxel_exact_and_validates(site: tuple[Path, Path], task: str, tmp_path: Path) -> None:
    plan, mask = lesion_images(site, task)[0]
    written = write_lesion_segmentation(plan, mask, tmp_path, model_sha256=SHA, task=f"{task}-seg")
    assert written.voxels == mask.sum() and not written.empty
    assert plan.key not in written.path.name and plan.study_uid not in str(written.path)
    assert dciodvfy_errors(written.path) == []
    seg = hd.seg.segread(written.path)
    uids = source_uids(plan)
    back = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                             combine_segments=True)
    assert np.array_equal(back.reshape(mask.shape) > 0, mask)
    # What a viewer needs: the source study, every source instance referenced, one AUTOMATIC segment by oncofed.
    source = pydicom.dcmread(plan.paths[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == plan.study_uid and seg.SegmentationType == "BINARY"
    referenced = [i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for i in s.ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(uids) and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == plan.series_uid
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert algorithm.AlgorithmName == "oncofed" and SHA[:12] in algorithm.AlgorithmVersion
    assert seg.ContentDescription == RESEARCH_NOTE and seg.SeriesDescription.startswith("RESEARCH")
    assert RESEARCH_NOTE in seg.ImageComments
    if plan.spatial_dims == 3:
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.NumberOfFrames == plan.shape[0]
        assert "ml" in seg.SeriesDescription
        assert np.array_equal(on_plan_grid(seg.get_volume(combine_segments=True), plan), mask)
    else:  # a projection mammogram: no patient geometry; its orientation in words, as the source's
        assert "FrameOfReferenceUID" not in source and seg.NumberOfFrames == 1
        assert list(seg.PatientOrientation) == list(source.PatientOrientation)


def test_uids_are_the_same_each_time_and_an_empty_prediction_says_so(site: tuple[Path, Path], tmp_path: Path) -> None:
    plan, mask = lesion_images(site, "lung-ct")[0]
    first = write_lesion_segmentation(plan, mask, tmp_path / "a", model_sha256=SHA, task="lung-ct-seg")
    again = write_lesion_segmentation(plan, mask, tmp_path / "b", model_sha256=SHA, task="lung-ct-seg")
    other = write_lesion_segmentation(plan, mask, tmp_path / "c", model_sha256="7" * 64, task="lung-ct-seg")
    a, b = pydicom.dcmread(first.path), pydicom.dcmread(again.path)
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
        assert a[keyword].value == b[keyword].value
        assert a[keyword].value != pydicom.dcmread(other.path)[keyword].value  # another model: another object
    assert a.DimensionOrganizationSequence[0].DimensionOrganizationUID == \
        b.DimensionOrganizationSequence[0].DimensionOrganizationUID
    assert (first.series_uid, first.sop_instance_uid) == (str(a.SeriesInstanceUID), str(a.SOPInstanceUID))

    empty = write_lesion_segmentation(plan, np.zeros_like(mask), tmp_path / "empty", model_sha256=SHA,
                                      task="lung-ct-seg")
    assert empty.empty and dciodvfy_errors(empty.path) == []
    seg = hd.seg.segread(empty.path)
    assert seg.NumberOfFrames == plan.shape[0] and not seg.pixel_array.any()  # every frame kept, all zero
    assert "no lesion found" in seg.SeriesDescription and "no lesion found" in seg.ImageComments
    with pytest.raises(SegDicomError, match=f"image {plan.key}: mask shape"):
        write_lesion_segmentation(plan, mask[1:], tmp_path, model_sha256=SHA, task="lung-ct-seg")


def test_a_multiframe_source_gets_its_frames_in_its_own_order(tmp_path: Path) -> None:
    from dicom_factory import write_enhanced

    path, _, frame_of_slice = write_enhanced(tmp_path / "enhanced", n=12, rows=8, cols=6, seed=2)
    (plan,) = plan_images([read_header(path)])
    mask = np.zeros(plan.shape, bool)
    mask[3:6, 2:5, 1:4] = True  # slices in spatial order; the object stores them shuffled
    written = write_lesion_segmentation(plan, mask, tmp_path / "seg", model_sha256=SHA, task="lung-ct-seg")
    seg = hd.seg.segread(written.path)
    source = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    back = seg.get_pixels_by_source_frame(source_sop_instance_uid=source,
                                          source_frame_numbers=[f + 1 for f in frame_of_slice], segment_numbers=[1],
                                          combine_segments=True)
    assert np.array_equal(back > 0, mask)
