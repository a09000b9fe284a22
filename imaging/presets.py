"""The four cancer task presets: what each task reads and how its images are prepared.

A preset is plain data. The MONAI pipelines that apply it live in :mod:`imaging.transforms`.
Adding a task means adding one :class:`TaskPreset` to :data:`PRESETS` (see the README).
Spatial tuples are in MONAI's array axis order: ``(x, y[, z])`` = (column, row[, slice]).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imaging.dicom import ReadPolicy

__all__ = [
    "PRESETS",
    "SEGMENTATION_PRESETS",
    "SEGMENTATION_SUFFIX",
    "TASKS",
    "Augment",
    "Intensity",
    "TaskPreset",
    "get_preset",
    "is_2d_modality",
    "min_slices_for_modality",
    "read_policy",
    "tasks_for_modality",
    "tasks_for_series",
]


# Settings of the CT steps that no preset varies (imaging.transforms.CalibrateHUd and SuppressBrightd); here, as plain
# data, so that a MONAI bundle config (imaging.bundle) writes them out as the training pipeline uses them.
FAT_MAX_SHIFT_HU = 60.0  # the largest calibration drift taken out
SUPPRESS_FILL_HU = -100.0  # what a suppressed bright voxel becomes (fat)
BRIGHT_MEDIAN = 3  # the median (voxels) the bright-structure threshold reads through
BONE_HU = 300.0  # above this a voxel is bone whatever the median reads (a rib one voxel thick)


class Intensity(StrEnum):
    """How raw intensities become network inputs."""

    CT_WINDOW = "ct-window"  # clip Hounsfield units to a window, scale to [0, 1]
    MR_ZSCORE = "mr-zscore"  # robust z-score: clip to percentiles, centre on the median
    MG_SCALE = "mg-scale"  # scale percentiles of the breast to [0, 1]


@dataclass(frozen=True)
class Augment:
    """Training-time augmentations (applied only to the training split).

    Args:
        flip_axes: Spatial axes that may be mirrored (probability 0.5 each).
        rotate_deg: Maximum in-plane rotation in degrees.
        zoom: Maximum relative zoom (0.1 = ±10 %).
        intensity_shift: Maximum additive shift after normalisation.
        intensity_scale: Maximum relative scale after normalisation.
        noise_std: Standard deviation of added Gaussian noise after normalisation.
    """

    flip_axes: tuple[int, ...] = ()
    rotate_deg: float = 10.0
    zoom: float = 0.1
    intensity_shift: float = 0.05
    intensity_scale: float = 0.1
    noise_std: float = 0.02


@dataclass(frozen=True)
class TaskPreset:
    """A cancer task: which images it takes and how they are normalised.

    Args:
        name: The task key used in labels, run configuration and the CLI.
        title: A human name.
        modality: The DICOM Modality the task reads.
        spatial_dims: 2 for single images (mammography), 3 for volumes.
        body_parts: BodyPartExamined words that point to this task (``CHEST`` in ``CHEST_TO_PELVIS`` too).
        description_words: Words of a SeriesDescription or ProtocolName that point to this task, read when
            BodyPartExamined names no region a task reads (it is often empty in real data).
        target_spacing: Resampling target in mm, MONAI axis order.
        spatial_size: Network input size after crop/pad, MONAI axis order.
        intensity: The normalisation kind.
        window: For CT: the HU window (low, high).
        percentiles: For MR and MG: the percentiles mapped to the ends of the range.
        min_slices: A 3D series with fewer slices is rejected.
        canonical_laterality: For mammography: images of the other side are mirrored to this one.
        lung_field: For chest CT: keep only the lung fields (see ``imaging.transforms.LungFieldd``).
        remove_pectoral: For mammography: set the pectoral muscle of MLO views to background
            (``imaging.transforms.FindPectorald`` and ``RemovePectorald``).
        calcification_gain: For mammography: add this many times the image's white top-hat, its bright detail
            narrower than ``calcification_mm``, after intensity scaling (``imaging.transforms.EnhanceCalcificationsd``),
            so that calcifications stand out of dense tissue; 0 leaves the image as it is.
        calcification_mm: The top-hat's disk, in mm.
        fat_reference_hu: For CT: shift each scan so that its fat peak reads this HU (see
            ``imaging.transforms.CalibrateHUd``), before any fixed-HU step; None leaves the scanner's calibration.
        suppress_above_hu: For abdominal CT: replace bone and enhancing organs above this HU by fat
            (see ``imaging.transforms.SuppressBrightd``); None keeps them.
        augment: Training-time augmentations.
        diagnostic_spacing: ``target_spacing`` of the diagnostic resolution profile.
        diagnostic_size: ``spatial_size`` of the diagnostic resolution profile.
        segmentation: A lesion segmentation task (``<image task>-seg``): the image task's images and
            preprocessing, with a lesion mask from the study's DICOM SEG or RT Structure Set as the target.
        patch_size: Segmentation: the patch trained on and slid over the input at inference (MONAI axis order).
        diagnostic_patch: ``patch_size`` of the diagnostic resolution profile.
        min_lesion_mm: Segmentation: a predicted lesion (connected component) smaller than a sphere (a disk in 2D)
            of this diameter is not reported: it is dropped before the metrics and before the mask is written.
    """

    name: str
    title: str
    modality: str
    spatial_dims: int
    body_parts: tuple[str, ...]
    description_words: tuple[str, ...]
    target_spacing: tuple[float, ...]
    spatial_size: tuple[int, ...]
    intensity: Intensity
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)
    min_slices: int = 1
    canonical_laterality: str | None = None
    lung_field: bool = False
    remove_pectoral: bool = False
    calcification_gain: float = 0.0
    calcification_mm: float = 3.2
    fat_reference_hu: float | None = None
    suppress_above_hu: float | None = None
    augment: Augment = field(default_factory=Augment)
    diagnostic_spacing: tuple[float, ...] = ()
    diagnostic_size: tuple[int, ...] = ()
    segmentation: bool = False
    patch_size: tuple[int, ...] = ()
    diagnostic_patch: tuple[int, ...] = ()
    min_lesion_mm: float = 0.0

    @property
    def calcification_size(self) -> int:
        """The diameter in pixels of the calcification disk (``calcification_mm`` at the preset's pixel spacing): 4
        at the cpu profile's 0.8 mm, 16 at the diagnostic 0.2 mm."""
        return max(2, round(self.calcification_mm / min(self.target_spacing)))

    @property
    def image_task(self) -> str:
        """The task whose images this task reads: itself, or for ``X-seg`` the image task ``X``."""
        return self.name.removesuffix(SEGMENTATION_SUFFIX) if self.segmentation else self.name

    def at(self, resolution: str) -> TaskPreset:
        """This preset at a resolution profile: ``cpu`` (itself) or ``diagnostic`` (its diagnostic voxel size and
        field of view; the rest unchanged)."""
        if resolution == "cpu":
            return self
        if resolution != "diagnostic":
            raise ValueError(f"unknown resolution profile {resolution!r}: cpu or diagnostic")
        return replace(self, target_spacing=self.diagnostic_spacing, spatial_size=self.diagnostic_size,
                       patch_size=self.diagnostic_patch)


PRESETS: MappingProxyType[str, TaskPreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            TaskPreset(
                name="lung-ct",
                title="Lung nodule, chest CT",
                modality="CT",
                spatial_dims=3,
                body_parts=("CHEST", "LUNG", "THORAX", "TORSO", "WHOLEBODY", "CAP"),
                description_words=("chest", "thorax", "thx", "lung", "pulm"),
                target_spacing=(5.5, 5.5, 5.0),
                spatial_size=(64, 64, 32),
                intensity=Intensity.CT_WINDOW,
                window=(-1000.0, 400.0),
                min_slices=16,
                lung_field=True,
                augment=Augment(flip_axes=(0,), rotate_deg=8.0),
                # 1.5 mm in-plane, 2.5 mm slices: a 6 mm nodule spans 4 voxels (1 at 5.5 mm); 336 x 336 x 320 mm.
                diagnostic_spacing=(1.5, 1.5, 2.5),
                diagnostic_size=(224, 224, 128),
            ),
            TaskPreset(
                name="breast-mg",
                title="Breast mass or calcifications, mammography",
                modality="MG",
                spatial_dims=2,
                body_parts=("BREAST",),
                description_words=("mammo", "breast"),
                target_spacing=(0.8, 0.8),
                spatial_size=(128, 160),
                intensity=Intensity.MG_SCALE,
                percentiles=(0.5, 99.5),
                canonical_laterality="R",
                remove_pectoral=True,
                calcification_gain=4.0,
                augment=Augment(flip_axes=(1,), rotate_deg=5.0),
                # 0.2 mm pixels (calcifications of 0.2-0.5 mm stay visible) over 205 x 256 mm, a full breast.
                diagnostic_spacing=(0.2, 0.2),
                diagnostic_size=(1024, 1280),
            ),
            TaskPreset(
                name="colorectal-ct",
                title="Colorectal mass, abdominal CT",
                modality="CT",
                spatial_dims=3,
                body_parts=("ABDOMEN", "PELVIS", "COLON", "RECTUM", "TORSO", "WHOLEBODY", "CAP"),
                description_words=("abd", "pelv", "colon", "rect"),
                target_spacing=(5.5, 5.5, 5.0),
                spatial_size=(64, 64, 32),
                intensity=Intensity.CT_WINDOW,
                window=(-200.0, 250.0),
                min_slices=16,
                fat_reference_hu=-100.0,
                suppress_above_hu=160.0,
                augment=Augment(flip_axes=(0,), rotate_deg=8.0),
                # 1.5 mm in-plane, 3 mm slices over 384 x 384 x 288 mm: abdomen and pelvis.
                diagnostic_spacing=(1.5, 1.5, 3.0),
                diagnostic_size=(256, 256, 96),
            ),
            TaskPreset(
                name="prostate-mr",
                title="Prostate lesion, T2-weighted MRI",
                modality="MR",
                spatial_dims=3,
                body_parts=("PROSTATE", "PELVIS"),
                description_words=("prostat",),
                target_spacing=(2.5, 2.5, 4.0),
                spatial_size=(48, 48, 16),
                intensity=Intensity.MR_ZSCORE,
                percentiles=(1.0, 99.0),
                min_slices=10,
                augment=Augment(flip_axes=(0,), rotate_deg=8.0),
                # T2 at 0.5 mm in-plane and 3 mm slices (PI-RADS technical standard) over 128 x 128 x 72 mm.
                diagnostic_spacing=(0.5, 0.5, 3.0),
                diagnostic_size=(256, 256, 24),
            ),
        )
    }
)

SEGMENTATION_SUFFIX = "-seg"

# Patches for segmentation (training crops, and the sliding window at inference): at the cpu profile most of the
# input, so a patch holds the organ around a lesion; at the diagnostic profile what one GPU holds per sample.
_PATCHES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lung-ct": ((48, 48, 32), (96, 96, 64)),
    "breast-mg": ((96, 96), (384, 384)),
    "colorectal-ct": ((48, 48, 32), (128, 128, 64)),
    "prostate-mr": ((48, 48, 16), (128, 128, 24)),
}

# The smallest lesion a segmentation reports (diameter in mm): below it a predicted component is a speck, not a
# finding. Lung: nodules under 4 mm need no follow-up (Fleischner); breast: 3 mm (a mass or a cluster's extent, not a
# single calcification); colorectal: 10 mm (a cancer this small is a polyp for endoscopy, not CT staging); prostate:
# 5 mm (below PI-RADS' smallest measurable lesion).
_MIN_LESION_MM: dict[str, float] = {"lung-ct": 4.0, "breast-mg": 3.0, "colorectal-ct": 10.0, "prostate-mr": 5.0}

SEGMENTATION_PRESETS: MappingProxyType[str, TaskPreset] = MappingProxyType(
    {
        f"{base.name}{SEGMENTATION_SUFFIX}": replace(
            base, name=f"{base.name}{SEGMENTATION_SUFFIX}", title=f"{base.title}: lesion segmentation",
            segmentation=True, patch_size=_PATCHES[base.name][0], diagnostic_patch=_PATCHES[base.name][1],
            min_lesion_mm=_MIN_LESION_MM[base.name])
        for base in PRESETS.values()
    }
)
"""One lesion segmentation task per image task: the same images and preprocessing, a mask as the target.
:data:`PRESETS` (the image tasks) decide which series a task reads; these read their image task's series."""

TASKS: tuple[str, ...] = (*PRESETS, *SEGMENTATION_PRESETS)
"""Every task name, image tasks first."""


def get_preset(name: str, resolution: str = "cpu") -> TaskPreset:
    """The preset called ``name``, at a resolution profile (``cpu``, the default, or ``diagnostic``).

    Raises:
        KeyError: With the list of known tasks, if ``name`` is not one.
        ValueError: An unknown resolution profile.
    """
    preset = PRESETS.get(name) or SEGMENTATION_PRESETS.get(name)
    if preset is None:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return preset.at(str(resolution))


def tasks_for_series(modality: str, body_part: str = "", description: str = "") -> tuple[str, ...]:
    """The tasks a series is for: its modality, then its region.

    BodyPartExamined decides when it names a region some task of the modality reads (``CHEST`` → lung,
    ``ABDOMEN`` → colorectal, a chest-abdomen-pelvis CT → both); otherwise the SeriesDescription or
    ProtocolName words do; a series that names a region no task reads (a head CT) is for no task; one that
    names no region at all stays a candidate for every task of its modality (labels then decide).
    """
    candidates = [p for p in PRESETS.values() if p.modality == modality]
    part = "".join(ch for ch in body_part.upper() if ch.isalnum())
    words = description.lower()
    by_part = tuple(p.name for p in candidates if any(token in part for token in p.body_parts)) if part else ()
    by_words = tuple(p.name for p in candidates if any(w in words for w in p.description_words))
    if by_part or by_words:
        return by_part or by_words
    return () if part else tuple(p.name for p in candidates)


def tasks_for_modality(modality: str) -> tuple[str, ...]:
    """The tasks that read images of ``modality`` (empty if none does)."""
    return tuple(p.name for p in PRESETS.values() if p.modality == modality)


def min_slices_for_modality(modality: str) -> int:
    """The fewest slices any 3D task of ``modality`` accepts (1 if no 3D task reads it)."""
    counts = [p.min_slices for p in PRESETS.values() if p.modality == modality and p.spatial_dims == 3]
    return min(counts) if counts else 1


def read_policy() -> ReadPolicy:
    """What ingest reads for the tasks: their modalities, the 2D ones, and each modality's fewest slices."""
    from imaging.dicom import ReadPolicy

    return ReadPolicy(modalities=frozenset(p.modality for p in PRESETS.values()),
                      two_d=frozenset(p.modality for p in PRESETS.values() if is_2d_modality(p.modality)),
                      min_slices=tuple((m, min_slices_for_modality(m)) for m in sorted({p.modality for p in
                                                                                       PRESETS.values()})))


def is_2d_modality(modality: str) -> bool:
    """Whether every task reading ``modality`` takes single 2D images (each instance its own image)."""
    dims = {p.spatial_dims for p in PRESETS.values() if p.modality == modality}
    return dims == {2}
