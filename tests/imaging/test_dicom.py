"""Reading DICOM: pydicom's real files, slice order, geometry checks, rescale, multi-frame."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_enhanced, write_mammogram, write_series

from imaging.dicom import affine_lps, decode_pixels, plan_images, read_header, read_image
from imaging.errors import DicomError, Reason
from imaging.presets import read_policy

LOSSLESS_TWINS = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_expb.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", LOSSLESS_TWINS)
def test_lossless_twins_decode_to_the_uncompressed_array(pydicom_files: Path, name: str) -> None:
    reference = decode_pixels(pydicom_files / "MR_small.dcm")
    twin = decode_pixels(pydicom_files / name)
    assert twin.shape == reference.shape == (64, 64)
    np.testing.assert_array_equal(twin.astype(np.int32), reference.astype(np.int32))


def test_real_ct_header(pydicom_files: Path) -> None:
    h = read_header(pydicom_files / "CT_small.dcm")
    assert (h.modality, h.rows, h.cols, h.n_frames) == ("CT", 128, 128, 1)
    assert h.frames[0].position is not None and h.frames[0].orientation is not None
    assert h.pixel_spacing is not None and h.frames[0].intercept == pytest.approx(-1024.0)


def test_truncated_pixel_data(pydicom_files: Path) -> None:
    with pytest.raises(DicomError) as err:
        decode_pixels(pydicom_files / "MR_truncated.dcm")
    assert err.value.reason is Reason.TRUNCATED_PIXEL_DATA
    assert "MR_truncated.dcm" in str(err.value)


def test_corrupt_compressed_stream_is_rejected_before_decoding(pydicom_files: Path, tmp_path: Path) -> None:
    data = bytearray((pydicom_files / "MR_small_jp2klossless.dcm").read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # JPEG 2000 codestream: SOC + SIZ markers
    assert start > 0
    data[start + 40 : start + 400] = b"\x00" * 360
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(bytes(data))
    with pytest.raises(DicomError) as err:
        decode_pixels(bad)
    assert err.value.reason is Reason.CORRUPT_CODESTREAM  # the zeroed SIZ marker no longer fits the header


def test_not_dicom_and_malformed(pydicom_files: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(DicomError) as err:
        read_header(text)
    assert err.value.reason is Reason.NOT_DICOM and err.value.path == text
    with pytest.raises(DicomError) as err:
        read_header(pydicom_files / "badVR.dcm")
    assert err.value.reason is Reason.UNREADABLE and "NumberOfFrames" in err.value.message


def test_files_without_meta_header(pydicom_files: Path) -> None:
    # Without the DICM prefix a file is accepted only if it parses as a dataset with its UIDs.
    header = read_header(pydicom_files / "ExplVR_BigEndNoMeta.dcm")
    assert header.sop_instance_uid and header.modality == "RTPLAN"
    with pytest.raises(DicomError) as err:
        read_header(pydicom_files / "no_meta.dcm")  # no StudyInstanceUID
    assert err.value.reason is Reason.NOT_DICOM


def test_dicomdir_is_an_index(pydicom_files: Path) -> None:
    with pytest.raises(DicomError) as err:
        read_header(pydicom_files / "dicomdirtests" / "DICOMDIR")
    assert err.value.reason is Reason.DICOMDIR


def test_slices_ordered_by_position_not_names_or_instance_numbers(tmp_path: Path) -> None:
    paths, volume, _ = write_series(tmp_path / "s", n=20, seed=3)
    headers = [read_header(p) for p in sorted(tmp_path.joinpath("s").iterdir())]
    assert [h.path for h in headers] != paths, "file names must not already be in spatial order"
    numbers = [h.instance_number for h in sorted(headers, key=lambda h: h.frames[0].position[2])]
    assert numbers != sorted(numbers), "InstanceNumbers must not already be in spatial order"
    (plan,) = plan_images(headers)
    assert [s.path for s in plan.slices] == paths
    image = read_image(plan)
    np.testing.assert_array_equal(image.array, volume.astype(np.float32) - 1024.0)
    assert plan.shape == (20, 8, 6)
    assert plan.spacing == pytest.approx((2.5, 0.8, 0.7))


def test_oblique_series_with_descending_positions(tmp_path: Path) -> None:
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)
    positions = [-k * 3.0 for k in range(16)]  # written from the top down
    paths, volume, _ = write_series(tmp_path, positions=positions, orientation=orientation, modality="MR",
                                    intercept=0.0)
    (plan,) = plan_images([read_header(p) for p in paths])
    image = read_image(plan)
    np.testing.assert_array_equal(image.array, volume[::-1].astype(np.float32))
    assert plan.spacing[0] == pytest.approx(3.0)
    # The affine maps voxel (col, row, slice) to the patient position of that voxel.
    affine = affine_lps(plan)
    first = np.asarray(read_header(paths[-1]).frames[0].position)
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*first, 1], atol=1e-6)
    np.testing.assert_allclose(affine @ [2, 3, 4, 1], [*(first + 2 * 0.7 * np.array([1, 0, 0])
                                                        + 3 * 0.8 * np.array([0, c, s])
                                                        + 4 * 3.0 * np.cross([1, 0, 0], [0, c, s])), 1],
                               atol=1e-6)


def test_rescale_slope_and_intercept(tmp_path: Path) -> None:
    paths, volume, _ = write_series(tmp_path, slope=0.5, intercept=-1000.0)
    (plan,) = plan_images([read_header(p) for p in paths])
    np.testing.assert_allclose(read_image(plan).array, volume * 0.5 - 1000.0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"positions": [k * 2.5 for k in range(20) if k != 7]}, Reason.MISSING_SLICE),
        ({"positions": [k * 2.5 for k in range(19)] + [18 * 2.5]}, Reason.DUPLICATE_SLICE_POSITION),
        ({"positions": [k * 2.5 + (0.6 if k > 10 else 0) for k in range(20)]}, Reason.UNEVEN_SPACING),
        ({"n": 5}, Reason.TOO_FEW_SLICES),
        ({"in_plane_drift": 0.8}, Reason.SHEARED_GEOMETRY),
        ({"orientations": [(1, 0, 0, 0, 1, 0)] * 19 + [(1, 0, 0, 0, 0, -1)]}, Reason.MIXED_ORIENTATION),
    ],
    ids=["missing", "duplicate", "uneven", "too-few", "sheared", "mixed-orientation"],
)
def test_inconsistent_geometry_is_rejected_with_reason(tmp_path: Path, kwargs: dict, reason: Reason) -> None:
    paths, _, _ = write_series(tmp_path, **kwargs)
    with pytest.raises(DicomError) as err:
        plan_images([read_header(p) for p in paths], policy=read_policy())  # the tasks' fewest slices
    assert err.value.reason is reason
    assert err.value.message  # says what is wrong and what to do


def test_enhanced_multiframe_frames_in_spatial_order(tmp_path: Path) -> None:
    path, volume, frame_of_slice = write_enhanced(tmp_path)
    header = read_header(path)
    assert header.n_frames == 20 and header.pixel_spacing == (0.5, 0.5)
    (plan,) = plan_images([header])
    assert [s.frame for s in plan.slices] == frame_of_slice
    np.testing.assert_array_equal(read_image(plan).array, volume.astype(np.float32) - 1024.0)
    assert plan.spacing == pytest.approx((3.0, 0.5, 0.5))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    path2, pixels = write_mammogram(tmp_path / "m2", photometric="MONOCHROME2")
    path1, _ = write_mammogram(tmp_path / "m1", photometric="MONOCHROME1", laterality="R")
    (p2,) = plan_images([read_header(path2)])
    (p1,) = plan_images([read_header(path1)])
    assert p2.spatial_dims == 2 and p1.laterality == "R" and p2.laterality == "L"
    np.testing.assert_array_equal(read_image(p2).array, pixels)
    np.testing.assert_array_equal(read_image(p1).array, 4095 - pixels.astype(np.float32))


def test_colour_images_are_rejected(pydicom_files: Path, tmp_path: Path) -> None:
    src = tmp_path / "rgb.dcm"
    shutil.copy(pydicom_files / "SC_rgb_small_odd.dcm", src)
    header = read_header(src)
    # Pretend it is a modality a task reads, to reach the colour check.
    object.__setattr__(header, "modality", "MR")
    with pytest.raises(DicomError) as err:
        plan_images([header])
    assert err.value.reason is Reason.COLOUR_IMAGE
