"""DICOM objects of a saliency map, for the radiologist's own viewer and the PACS.

Two objects per image, both derived from and referencing the source series, and marked for research
use only:

- a **Parametric Map** (highdicom) of a volume: the map on the source series' own grid (same frame of
  reference, plane positions and orientation, one frame per source slice), stored as 16-bit integers
  with a real-world value mapping to [0, 1]. Viewers that fuse parametric maps (3D Slicer, OHIF)
  lay it over the CT or MR. A projection mammogram has no patient geometry for a Parametric Map's
  plane functional groups, so it gets the key images only;
- **key images**: RGB Secondary Capture images of the source slices where the map is strongest (the
  whole image for a mammogram), the grey image with the map blended over it in colour, so every
  viewer shows them. Each references its source image and carries its pixel spacing and orientation.

The map must already be on the DICOM grid (:func:`imaging.transforms.network_to_source`). UIDs are
derived from the source series, the model and the method, so writing the same map again gives the same
objects (a PACS then replaces rather than duplicates them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from imaging.dicom import ImagePlan

__all__ = [
    "PM_SCALE",
    "RESEARCH_NOTE",
    "SaliencyDicomError",
    "SaliencyObjects",
    "blend",
    "key_images",
    "key_slices",
    "parametric_map",
    "write_saliency_objects",
]

RESEARCH_NOTE = "RESEARCH USE ONLY - not for diagnostic use"
MANUFACTURER = "oncofed"
SOFTWARE_VERSION = "0.3.10"
PM_SERIES_NUMBER = 9901
KEY_IMAGE_SERIES_NUMBER = 9902
PM_SCALE = 1000  # stored value = round(map * PM_SCALE)


class SaliencyDicomError(ValueError):
    """The map does not fit its source image; the message names the image."""


@dataclass(frozen=True)
class SaliencyObjects:
    """What was written for one image: files and the series they belong to."""

    parametric_map: Path | None
    key_images: tuple[Path, ...]
    series_uids: tuple[str, ...]

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file written."""
        return ((self.parametric_map,) if self.parametric_map else ()) + self.key_images


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["oncofed-saliency", *parts]))


def _pm_series(plan: ImagePlan, model_sha256: str, method: str) -> str:
    return _uid(plan.series_uid, model_sha256, method, "pm")


def _key_series(plan: ImagePlan, model_sha256: str, method: str) -> str:
    return _uid(plan.series_uid, plan.key, model_sha256, method, "key")


def _letters(vector: Sequence[float]) -> str:
    """The patient orientation letters of a direction in LPS (up to two, strongest first)."""
    names = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(np.asarray(vector, float)))
    out = ""
    for axis in order[:2]:
        if abs(vector[axis]) > 0.25:
            out += names[axis][0] if vector[axis] > 0 else names[axis][1]
    return out or "L"


def _grey(image: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Window (or 1st-99th percentile) to uint8."""
    lo, hi = window if window is not None else tuple(np.percentile(image, [1.0, 99.0]))
    return (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def blend(grey: np.ndarray, heat: np.ndarray, *, threshold: float = 0.2, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 overlay: the grey image with the map in the 'jet' colours where it is ≥ ``threshold``."""
    from matplotlib import colormaps

    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    a = np.where(heat >= threshold, alpha, 0.0)[..., None]
    return np.clip(rgb * (1 - a) + colour * a, 0, 255).astype(np.uint8)


def key_slices(heat: np.ndarray, count: int) -> list[int]:
    """The ``count`` slices (first axis) where the map is strongest, in slice order."""
    strength = heat.reshape(heat.shape[0], -1).max(axis=1)
    best = np.argsort(-strength, kind="stable")[:count]
    return sorted(int(k) for k in best)


def _sources(plan: ImagePlan) -> list[Dataset]:
    """The source files' headers, in the plan's slice order (one per file)."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in plan.paths]


def _describe(kind: str, method: str, probability: float) -> str:
    return f"RESEARCH {kind} {method} p={probability:.2f}"[:64]


def _comment(method: str, probability: float, model_sha256: str, task: str) -> str:
    return (f"{RESEARCH_NOTE}. oncofed saliency map ({method}) of the model sha256:{model_sha256[:16]} for the "
            f"task {task}; model probability {probability:.3f}. The colours show where the model looked, not "
            "a finding.")


def parametric_map(plan: ImagePlan, heat: np.ndarray, out: Path, *, method: str, probability: float,
                   model_sha256: str, task: str) -> Path:
    """Write the map of a volume as a Parametric Map on the source grid; return the file.

    Args:
        plan: The source image (a volume with patient geometry).
        heat: ``(slices, rows, cols)`` in [0, 1], on the source grid.
        out: Folder to write into.
        method: Saliency method name.
        probability: The model's probability for the study.
        model_sha256: Hash of the model file.
        task: The task name.

    Raises:
        SaliencyDicomError: A 2D image, or a map of another shape.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if plan.spatial_dims != 3 or plan.orientation is None:
        raise SaliencyDicomError(f"image {plan.key}: a Parametric Map needs a volume with patient geometry")
    if heat.shape != plan.shape:
        raise SaliencyDicomError(f"image {plan.key}: map shape {heat.shape} differs from the image's {plan.shape}")
    sources = _sources(plan)
    if len(sources) != len(plan.slices):
        raise SaliencyDicomError(f"image {plan.key}: multi-frame sources are not written as Parametric Maps yet")
    stored = np.round(np.clip(heat, 0, 1) * PM_SCALE).astype(np.uint16)
    series_uid = _pm_series(plan, model_sha256, method)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="SALIENCY", lut_explanation=f"{method} saliency, 0 (none) to 1 (strongest)",
        unit=codes.UCUM.NoUnits, value_range=(0, PM_SCALE), slope=1.0 / PM_SCALE, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=sources, pixel_array=stored, series_instance_uid=series_uid, series_number=PM_SERIES_NUMBER,
        sop_instance_uid=_uid(series_uid, "1"), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=f"oncofed {task}", software_versions=SOFTWARE_VERSION, device_serial_number="none",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=PM_SCALE / 2, window_width=PM_SCALE)],
        content_label="SALIENCY", content_description=RESEARCH_NOTE[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
    )
    pm.SeriesDescription = _describe("saliency map", method, probability)
    if "Laterality" not in pm:
        pm.Laterality = ""  # Type 2C of General Series: present and empty for an unpaired body part
    path = out / f"{method}-{plan.key[-12:]}-pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    return path


def key_images(plan: ImagePlan, heat: np.ndarray, image: np.ndarray, out: Path, *, method: str, probability: float,
               model_sha256: str, task: str, window: tuple[float, float] | None, count: int = 5) -> list[Path]:
    """Write RGB Secondary Capture key images (source slice + map in colour); return the files.

    Args:
        plan: The source image.
        heat: The map on the source grid (``(slices, rows, cols)`` or ``(rows, cols)``), in [0, 1].
        image: The source pixels in modality units, same shape.
        out: Folder to write into.
        method: Saliency method name.
        probability: The model's probability.
        model_sha256: Hash of the model file.
        task: The task name.
        window: Grey window (CT HU) or None for percentiles.
        count: Slices of a volume to write (where the map is strongest).

    Raises:
        SaliencyDicomError: The map and the image differ in shape.
    """
    import highdicom as hd

    if heat.shape != plan.shape or image.shape != plan.shape:
        raise SaliencyDicomError(f"image {plan.key}: map {heat.shape} / image {image.shape} differ from the "
                                 f"plan's {plan.shape}")
    heat3 = heat[None] if plan.spatial_dims == 2 else heat
    image3 = image[None] if plan.spatial_dims == 2 else image
    grey = _grey(image3, window)
    series_uid = _key_series(plan, model_sha256, method)
    headers: dict[Path, Dataset] = {}
    paths = []
    for number, k in enumerate(key_slices(heat3, count), start=1):
        ref = plan.slices[k]
        source = headers.get(ref.path) or pydicom.dcmread(ref.path, stop_before_pixels=True)
        headers[ref.path] = source
        if plan.orientation is not None:
            rows_dir, cols_dir = plan.orientation[:3], plan.orientation[3:]
            orientation = (_letters(rows_dir), _letters(cols_dir))
        else:
            orientation = tuple(str(v) for v in (source.get("PatientOrientation") or ["", ""]))[:2]  # type: ignore[assignment]
        sc = hd.sc.SCImage.from_ref_dataset(
            source, blend(grey[k], heat3[k]), hd.PhotometricInterpretationValues.RGB, 8,
            hd.CoordinateSystemNames.PATIENT, series_uid, KEY_IMAGE_SERIES_NUMBER, _uid(series_uid, str(k)), number,
            MANUFACTURER, pixel_spacing=(float(plan.spacing[-2]), float(plan.spacing[-1])),  # type: ignore[arg-type]  # mm, the stub says int
            laterality=plan.laterality or None,
            patient_orientation=("A", "F"),  # placeholder for the constructor; the real letters are set below
        )
        sc.PatientOrientation = list(orientation)
        sc.SeriesDescription = _describe("key images", method, probability)
        sc.ImageComments = _comment(method, probability, model_sha256, task)
        sc.BurnedInAnnotation = "NO"
        sc.DerivationDescription = f"{method} saliency map blended over the source image"
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if ref.frame and int(source.get("NumberOfFrames", 1)) > 1:
            reference.ReferencedFrameNumber = ref.frame + 1
        sc.SourceImageSequence = [reference]
        if "Laterality" not in sc:
            sc.Laterality = plan.laterality or ""
        path = out / f"{method}-{plan.key[-12:]}-key{number:02d}.dcm"
        sc.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_saliency_objects(plan: ImagePlan, heat: np.ndarray, image: np.ndarray, out: Path, *, method: str,
                           probability: float, model_sha256: str, task: str,
                           window: tuple[float, float] | None, key_count: int = 5) -> SaliencyObjects:
    """The Parametric Map (volumes) and the key images of one image's map; see the module's docstring."""
    out.mkdir(parents=True, exist_ok=True)
    pm = None
    if plan.spatial_dims == 3 and plan.orientation is not None and len(plan.paths) == len(plan.slices):
        pm = parametric_map(plan, heat, out, method=method, probability=probability, model_sha256=model_sha256,
                            task=task)
    keys = key_images(plan, heat, image, out, method=method, probability=probability, model_sha256=model_sha256,
                      task=task, window=window, count=key_count)
    series = ((_pm_series(plan, model_sha256, method),) if pm is not None else ()) + (
        _key_series(plan, model_sha256, method),)
    return SaliencyObjects(parametric_map=pm, key_images=tuple(keys), series_uids=series)
