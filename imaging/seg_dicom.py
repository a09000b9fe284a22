"""A predicted lesion mask as a DICOM Segmentation, for the radiologist's own viewer and the PACS.

One SEG object per image (highdicom): BINARY, one segment ``lesion`` (category Morphologically Altered
Structure, type Neoplasm) whose algorithm type is AUTOMATIC and whose Algorithm Identification names oncofed, its
version and the model file's short SHA-256. It is derived from, and references, every source instance of the image;
a volume's SEG shares the source's frame of reference and plane positions (one frame per source slice, empty frames
kept), a projection mammogram's has no patient geometry and takes the source's PatientOrientation, as highdicom
requires of a single source image without plane position. The SEG is marked for research use only (its series
description, content description and image comments).

An empty prediction is still a valid SEG (every frame kept, all zero) whose descriptions say that no lesion was
found, so the PACS holds the model's answer for every study it was asked about.

The mask must already be on the DICOM grid: :func:`predicted_mask` carries the network's lesion probabilities there
and thresholds them. UIDs are derived from the source series, the model's SHA-256 and ``seg``, so writing the same
prediction again gives the same UIDs (a PACS then replaces rather than duplicates the object).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from imaging.dicom import ImagePlan
from imaging.presets import TaskPreset
from imaging.saliency_dicom import MANUFACTURER, RESEARCH_NOTE, SOFTWARE_VERSION
from imaging.transforms import network_to_source_index

__all__ = [
    "SEG_SERIES_NUMBER",
    "SegDicomError",
    "SegObject",
    "lesion_segmentation",
    "oncofed_version",
    "predicted_mask",
    "seg_uids",
    "short_hash",
    "write_lesion_segmentation",
]

SEG_SERIES_NUMBER = 9903  # next to the saliency series (9901 Parametric Map, 9902 key images)
SEGMENT_LABEL = "lesion"
CONTENT_LABEL = "PREDICTED_LESION"
_CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
_TYPE = ("108369006", "SCT", "Neoplasm")
_AI_FAMILY = ("123109", "DCM", "Artificial Intelligence")
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


class SegDicomError(ValueError):
    """The mask does not fit its source image, or the source cannot be referenced; the message names the image."""


@dataclass(frozen=True)
class SegObject:
    """The SEG written for one image.

    Attributes:
        path: The file.
        series_uid: Its SeriesInstanceUID.
        sop_instance_uid: Its SOPInstanceUID.
        voxels: Lesion voxels (pixels of a 2D image) in the mask.
    """

    path: Path
    series_uid: str
    sop_instance_uid: str
    voxels: int

    @property
    def empty(self) -> bool:
        """Whether the model found no lesion (the SEG's frames are all zero)."""
        return self.voxels == 0


def short_hash(text: str, length: int = 12) -> str:
    """A short SHA-256 of a text (a UID), for PHI-free file and folder names."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def oncofed_version() -> str:
    """The installed oncofed's version (the source tree's when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("oncofed")
    except importlib.metadata.PackageNotFoundError:
        return SOFTWARE_VERSION


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["oncofed-lesion-seg", *parts]))


def seg_uids(plan: ImagePlan, model_sha256: str) -> tuple[str, str]:
    """The SeriesInstanceUID and SOPInstanceUID of an image's SEG for a model: from the source series, the
    model's SHA-256 and ``seg`` (the two views of a mammography series share the series, not the instance)."""
    series = _uid(plan.series_uid, model_sha256, "seg")
    return series, _uid(series, plan.key, "instance")


def predicted_mask(probabilities: np.ndarray, plan: ImagePlan, preset: TaskPreset, *,
                   threshold: float = 0.5) -> np.ndarray:
    """The lesion mask on the image's DICOM grid: the network's probabilities resampled there with linear
    interpolation, then thresholded; equal to ``network_to_source(probabilities, plan, preset) > threshold``.

    A resampled value is a weighted mean of the (at most 8) network voxels around it and zeros outside, so it passes
    a threshold ≥ 0 only within one network voxel of a voxel that does: only the DICOM voxels in the box that maps
    into that neighbourhood are resampled (a 512 x 512 x 300 CT in well under a second, not twenty).

    Args:
        probabilities: Lesion probabilities on the network's grid, ``(x, y[, z])`` as the model returns them.
        plan: The source image.
        preset: The task preset (its geometric steps define the network's grid).
        threshold: Probability above which a voxel is lesion (at least 0).

    Returns:
        A boolean array of ``plan.shape`` (``(slices, rows, cols)`` or ``(rows, cols)``).

    Raises:
        SegDicomError: A negative threshold, or probabilities of another dimensionality than the image.
    """
    from scipy import ndimage

    if threshold < 0:
        raise SegDicomError(f"image {plan.key}: a threshold is at least 0, got {threshold}")
    dims = plan.spatial_dims
    volume = np.asarray(probabilities, np.float32)
    if volume.ndim != dims:
        raise SegDicomError(f"image {plan.key}: probabilities of shape {volume.shape} for a {dims}D image")
    out = np.zeros(plan.shape, bool)
    above = np.argwhere(volume > threshold)
    if not len(above):
        return out
    lo, hi = above.min(0) - 1.0, above.max(0) + 1.0
    to_source = network_to_source_index(plan, preset)
    corners = np.array(np.meshgrid(*[(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")).reshape(dims, -1)
    if dims == 2:
        corners = np.concatenate([corners, np.zeros_like(corners[:1])], 0)
    source = to_source[:3, :3] @ corners + to_source[:3, 3:4]  # (col, row, slice) of the box's corners
    size = tuple(reversed(plan.shape))  # (cols, rows[, slices])
    start = [max(0, int(np.floor(source[a].min()))) for a in range(dims)]
    stop = [min(size[a], int(np.ceil(source[a].max())) + 1) for a in range(dims)]
    if any(b <= a for a, b in zip(start, stop, strict=True)):
        return out
    axes = [np.arange(a, b) for a, b in zip(start, stop, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), 0).reshape(dims, -1).astype(np.float64)
    if dims == 2:
        grid = np.concatenate([grid, np.zeros_like(grid[:1])], 0)
    to_network = np.linalg.inv(to_source)
    mapped = to_network[:3, :3] @ grid + to_network[:3, 3:4]
    values = ndimage.map_coordinates(volume, mapped[:dims], order=1, mode="constant", cval=0.0)
    box = (values > threshold).reshape([b - a for a, b in zip(start, stop, strict=True)]).T  # -> ([slices,] rows, cols)
    out[tuple(slice(a, b) for a, b in reversed(list(zip(start, stop, strict=True))))] = box
    return out


def _sources(plan: ImagePlan, mask: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """The source headers a SEG references and the mask as its frames: one per source slice in the plan's order,
    or one multi-frame object with the mask put in its own frame order."""
    headers: list[Dataset] = [pydicom.dcmread(path, stop_before_pixels=True) for path in plan.paths]
    for header in headers:  # highdicom copies these Type 2 patient and study elements: empty where a source lacks one
        for keyword in _COPIED_TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
    frames = mask.reshape((-1, *plan.shape[-2:]))
    single = all(int(h.get("NumberOfFrames", 1) or 1) == 1 for h in headers)
    if single and len(headers) == len(plan.slices):
        return headers, frames
    if len(headers) == 1:
        ordered = np.zeros((int(headers[0].NumberOfFrames), *plan.shape[-2:]), frames.dtype)
        for k, ref in enumerate(plan.slices):
            ordered[ref.frame] = frames[k]
        return headers, ordered
    raise SegDicomError(f"image {plan.key}: its slices come from {len(headers)} multi-frame objects; a SEG references "
                        "one multi-frame source or single-frame slices (re-export the series either way)")


def _size(plan: ImagePlan, voxels: int) -> str:
    """The mask's size in words: ml for a volume, cm² for a 2D image."""
    if plan.spatial_dims == 3:
        return f"{voxels * float(np.prod(plan.spacing)) / 1000.0:.2f} ml"
    return f"{voxels * float(np.prod(plan.spacing)) / 100.0:.2f} cm2"


def lesion_segmentation(plan: ImagePlan, mask: np.ndarray, *, model_sha256: str, task: str,
                        threshold: float = 0.5) -> Dataset:
    """The SEG of an image's predicted lesion mask (see the module's docstring).

    Args:
        plan: The source image.
        mask: Boolean, on the source grid: ``plan.shape`` (``(slices, rows, cols)`` in the plan's slice order, or
            ``(rows, cols)``).
        model_sha256: SHA-256 of the model file.
        task: The segmentation task.
        threshold: The probability threshold the mask was cut at (recorded with the algorithm).

    Returns:
        The highdicom Segmentation dataset.

    Raises:
        SegDicomError: A mask of another shape than the image, or sources a SEG cannot reference or derive from.
    """
    import highdicom as hd

    mask = np.asarray(mask).astype(bool)
    if mask.shape != tuple(plan.shape):
        raise SegDicomError(f"image {plan.key}: mask shape {mask.shape} differs from the image's {plan.shape}")
    sources, frames = _sources(plan, mask)
    voxels = int(mask.sum())
    series_uid, sop_uid = seg_uids(plan, model_sha256)
    version = oncofed_version()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="oncofed", family=hd.sr.CodedConcept(*_AI_FAMILY), version=f"{version} model {model_sha256[:12]}",
        source="oncofed", parameters={"task": task, "model_sha256": model_sha256[:16], "threshold": f"{threshold:g}"})
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=SEGMENT_LABEL,
        segmented_property_category=hd.sr.CodedConcept(*_CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        tracking_uid=_uid(sop_uid, "tracking"), tracking_id="oncofed predicted lesion",
    )
    first = sources[0]
    instance_number = int(first.get("InstanceNumber") or 1) if plan.spatial_dims == 2 else 1
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=frames.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
            series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER, sop_instance_uid=sop_uid,
            instance_number=instance_number, manufacturer=MANUFACTURER, manufacturer_model_name=f"oncofed {task}",
            software_versions=version, device_serial_number="none", omit_empty_frames=False,
            content_label=CONTENT_LABEL, content_description=RESEARCH_NOTE[:64],
        )
    except (ValueError, AttributeError) as exc:  # a source header highdicom cannot derive from
        raise SegDicomError(f"image {plan.key} ({plan.paths[0]}): no SEG can be derived from it: {exc}") from None
    found = f"predicted lesion {_size(plan, voxels)}" if voxels else "no lesion found"
    seg.SeriesDescription = f"RESEARCH {found}"[:64]
    seg.ImageComments = (
        f"{RESEARCH_NOTE}. oncofed lesion mask ({task}) predicted by the model sha256:{model_sha256[:16]}, "
        f"probability above {threshold:g}: "
        + (f"{voxels} voxels, {_size(plan, voxels)}." if voxels else "no lesion found; every frame is empty.")
        + " The outline is the model's, not a finding.")
    # The same prediction gives the same object: highdicom draws these UIDs at random.
    dimension_uid = _uid(sop_uid, "dimension")
    for name in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(name, []):
            item.DimensionOrganizationUID = dimension_uid
    if seg.coordinate_system is None:
        # A projection image: no plane geometry (highdicom writes none); General Image needs the orientation in words.
        seg.PatientOrientation = first.get("PatientOrientation") or ""
    return seg


def write_lesion_segmentation(plan: ImagePlan, mask: np.ndarray, out: Path, *, model_sha256: str, task: str,
                              threshold: float = 0.5) -> SegObject:
    """Write :func:`lesion_segmentation` into ``out`` as ``seg-<hash of the image>.dcm`` (no UID in the name).

    Args:
        plan: The source image.
        mask: The predicted lesion mask on the source grid (see :func:`lesion_segmentation`).
        out: Folder to write into (created).
        model_sha256: SHA-256 of the model file.
        task: The segmentation task.
        threshold: The probability threshold the mask was cut at.

    Returns:
        The file and its UIDs.

    Raises:
        SegDicomError: See :func:`lesion_segmentation`.
    """
    seg = lesion_segmentation(plan, mask, model_sha256=model_sha256, task=task, threshold=threshold)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"seg-{short_hash(plan.key)}.dcm"
    seg.save_as(path, enforce_file_format=True)
    return SegObject(path=path, series_uid=str(seg.SeriesInstanceUID), sop_instance_uid=str(seg.SOPInstanceUID),
                     voxels=int(np.count_nonzero(mask)))
