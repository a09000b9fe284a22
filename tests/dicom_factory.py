"""Write small, exact DICOM series for tests (real Part-10 files through pydicom)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MG_IMAGE = "1.2.840.10008.5.1.4.1.1.1.2"


def marker_volume(n: int, rows: int, cols: int) -> np.ndarray:
    """Stored values whose slice k holds ``100*k + row + 10*col`` (distinct per slice, row and column)."""
    k, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (100 * k + r + 10 * c).astype(np.int16)


def _base(modality: str, sop_class: str, study: str, series: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.PatientID = patient_id
    ds.PatientName = "TEST^PATIENT"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyDate = "20240101"
    ds.AccessionNumber = "ACC-" + patient_id
    ds.Modality = modality
    ds.Manufacturer = "TESTCO"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series, "for"])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def write_series(
    folder: Path,
    *,
    positions: Sequence[float] | None = None,
    n: int = 20,
    rows: int = 8,
    cols: int = 6,
    spacing: float = 2.5,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    orientations: Sequence[Sequence[float]] | None = None,
    origin: Sequence[float] = (-10.0, -20.0, 30.0),
    in_plane_drift: float = 0.0,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    patient_id: str = "PAT-001",
    study_uid: str | None = None,
    seed: int = 0,
) -> tuple[list[Path], np.ndarray, str]:
    """Write a single-frame series with shuffled file names and InstanceNumbers.

    Args:
        folder: Where to write (created).
        positions: Offsets along the slice normal in mm (default: ``n`` evenly spaced by ``spacing``).
        orientations: One orientation per slice (overrides ``orientation``).
        in_plane_drift: mm of drift along the row direction per slice (gantry tilt).

    Returns:
        ``(paths in spatial order, stored volume in spatial order, series UID)``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    offsets = list(positions) if positions is not None else [k * spacing for k in range(n)]
    volume = marker_volume(len(offsets), rows, cols)
    study = study_uid or generate_uid(entropy_srcs=[patient_id, str(seed), "study"])
    series = generate_uid(entropy_srcs=[study, str(seed), str(offsets), str(orientation), "series"])
    ori = np.asarray(orientation, float)
    normal = np.cross(ori[:3], ori[3:])
    names = rng.permutation(len(offsets))
    numbers = rng.permutation(len(offsets)) + 1
    paths = []
    for k, offset in enumerate(offsets):
        o = orientations[k] if orientations is not None else orientation
        ds = _base(modality, CT_IMAGE, study, series, patient_id)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(numbers[k])
        ds.ImageOrientationPatient = [float(v) for v in o]
        pos = np.asarray(origin, float) + offset * normal + k * in_plane_drift * ori[:3]
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = spacing
        ds.Rows, ds.Columns = rows, cols
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = volume[k].tobytes()
        path = folder / f"IM{int(names[k]):05d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, volume, series


def write_enhanced(
    folder: Path, *, n: int = 20, rows: int = 8, cols: int = 6, spacing: float = 3.0, seed: int = 0
) -> tuple[Path, np.ndarray, list[int]]:
    """Write an enhanced multi-frame CT whose frames are stored in a shuffled order.

    Returns:
        ``(path, stored volume in spatial order, frame index of each spatial slice)``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    volume = marker_volume(n, rows, cols)
    order = rng.permutation(n)  # frame f holds spatial slice order[f]
    study = generate_uid(entropy_srcs=["enh", str(seed)])
    series = generate_uid(entropy_srcs=["enh-series", str(seed)])
    ds = _base("CT", ENHANCED_CT_IMAGE, study, series, "PAT-ENH")
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = spacing
    shared.PixelMeasuresSequence = DicomSequence([measures])
    plane = Dataset()
    plane.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared.PlaneOrientationSequence = DicomSequence([plane])
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, -1024, "HU"
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for f in range(n):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, float(order[f]) * spacing]
        item.PlanePositionSequence = DicomSequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack([volume[order[f]] for f in range(n)]).tobytes()
    path = folder / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    frame_of_slice = [int(np.flatnonzero(order == k)[0]) for k in range(n)]
    return path, volume, frame_of_slice


def write_mammogram(
    folder: Path, *, photometric: str = "MONOCHROME2", laterality: str = "L", bits_stored: int = 12
) -> tuple[Path, np.ndarray]:
    """Write one 2D mammogram with a gradient; returns ``(path, stored pixels)``."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=["mg", laterality, photometric])
    series = generate_uid(entropy_srcs=["mg-series", laterality, photometric])
    ds = _base("MG", MG_IMAGE, study, series, "PAT-MG")
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[series, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PhotometricInterpretation = photometric
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.ImageLaterality = laterality
    ds.ViewPosition = "CC"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.Rows, ds.Columns = 12, 10
    pixels = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 30) % (2**bits_stored)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path = folder / "mg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pixels
