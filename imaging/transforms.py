"""MONAI dictionary pipelines that apply a task preset to cataloged images.

Each sample is a dict ``{"image": <ImagePlan JSON>, "label": int, "laterality": str, ...}``. The
deterministic part of the pipeline (load, orient, resample, normalise, crop) is what the on-disk
cache stores; the random augmentations follow it and run every epoch (training split only).

A segmentation task's samples also hold ``"mask"``: the path of the image's lesion mask (an ``.npz`` holding
``mask`` in the image's DICOM layout), or an empty string for an image without a lesion; the mask goes through
the same geometric steps as the image, with nearest-neighbour resampling, and none of the intensity steps.

Arrays follow MONAI's layout: channel first, then ``(x, y[, z])`` = (column, row[, slice]), with a
RAS affine (MONAI's convention) built from the DICOM geometry.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
    Transform,
)

from imaging.catalog import plan_from_json
from imaging.dicom import ImagePlan, affine_lps, plan_images, read_header, read_image
from imaging.presets import BONE_HU, BRIGHT_MEDIAN, FAT_MAX_SHIFT_HU, SUPPRESS_FILL_HU, Intensity, TaskPreset

__all__ = [
    "CalibrateHUd",
    "EnhanceCalcificationsd",
    "FlipToLateralityd",
    "LoadDicomImaged",
    "LoadMaskd",
    "LoadPlanImaged",
    "LungFieldd",
    "FindPectorald",
    "RemovePectorald",
    "RobustScaled",
    "SuppressBrightd",
    "augmentations",
    "calcification_footprint",
    "deterministic_transforms",
    "fat_peak_hu",
    "mask_to_network_grid",
    "network_to_source",
    "network_to_source_index",
    "pipeline",
    "to_meta_tensor",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_meta_tensor(array: np.ndarray, plan: ImagePlan) -> MetaTensor:
    """A decoded DICOM-order array as a channel-first MONAI MetaTensor with a RAS affine.

    Args:
        array: ``(slices, rows, cols)`` or ``(rows, cols)``.
        plan: The image's plan (geometry).

    Returns:
        ``(1, cols, rows, slices)`` or ``(1, cols, rows)`` float32 with ``affine`` set.
    """
    data = np.ascontiguousarray(array.T)[None].astype(np.float32)
    affine = LPS_TO_RAS @ affine_lps(plan)
    if plan.spatial_dims == 2:
        # 2D images (mammograms carry no patient position): pixel spacing only, x = column.
        affine = np.diag([plan.spacing[1], plan.spacing[0], 1.0, 1.0])
    return MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(affine), meta={"space": "RAS"})


class LoadPlanImaged(MapTransform):
    """Decode the DICOM image described by a plan (or its JSON) into a MetaTensor.

    Args:
        keys: Keys holding an :class:`ImagePlan` or its JSON.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            plan = d[key] if isinstance(d[key], ImagePlan) else plan_from_json(d[key])
            d[key] = to_meta_tensor(read_image(plan).array, plan)
        return d


class LoadDicomImaged(MapTransform):
    """Read one 2D DICOM image (a mammogram) by its file path with oncofed's reader, as ingest does: pixel spacing
    from Imager/Pixel Spacing, the checks of :func:`imaging.dicom.plan_images`, and the image's laterality into
    ``laterality_key`` for :class:`FlipToLateralityd`.

    MONAI's ``PydicomReader`` cannot stand in here: a mammogram has no patient position or orientation, so it
    gets no pixel spacing, and a folder of views is read as one volume. Exported bundles of 2D tasks use this.

    Args:
        keys: Keys holding a DICOM file path.
        laterality_key: Where the image's laterality (``L``/``R``, or empty) goes.
        view_key: Where the image's ViewPosition (``CC``, ``MLO``, ..., or empty) goes.
    """

    def __init__(self, keys: KeysCollection, laterality_key: str = "laterality", view_key: str = "view") -> None:
        super().__init__(keys)
        self.laterality_key, self.view_key = laterality_key, view_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            (plan,) = plan_images([read_header(str(d[key]))])
            if plan.spatial_dims != 2:
                raise ValueError(f"{d[key]}: a {plan.modality} volume, not a 2D image")
            d[key] = to_meta_tensor(read_image(plan).array, plan)
            d[self.laterality_key] = plan.laterality
            d[self.view_key] = plan.view
        return d


class LoadMaskd(MapTransform):
    """Load an image's lesion mask onto the image's grid, as a MetaTensor with the image's affine. Runs before
    :class:`LoadPlanImaged` (it reads the plan the image key still holds).

    Args:
        keys: Keys holding the mask's ``.npz`` path (array ``mask``, the image's DICOM layout); an empty path is
            an image without a lesion (an empty mask).
        plan_key: The key holding the image's :class:`ImagePlan` or its JSON.
    """

    def __init__(self, keys: KeysCollection, plan_key: str = "image") -> None:
        super().__init__(keys)
        self.plan_key = plan_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        plan = d[self.plan_key] if isinstance(d[self.plan_key], ImagePlan) else plan_from_json(d[self.plan_key])
        for key in self.key_iterator(d):
            path = str(d[key] or "")
            if path:
                with np.load(path) as npz:
                    mask = np.asarray(npz["mask"]) > 0
                if mask.shape != tuple(plan.shape):
                    raise ValueError(f"lesion mask {path} is {mask.shape}, its image {tuple(plan.shape)}: re-ingest "
                                     "the annotation (oncofed-site ingest)")
            else:
                mask = np.zeros(plan.shape, bool)
            d[key] = to_meta_tensor(mask.astype(np.float32), plan)
        return d


class FlipToLateralityd(MapTransform):
    """Mirror mammograms of the other side so every breast faces the same way.

    Args:
        keys: Image keys.
        canonical: The laterality images are mirrored to ("L" or "R").
        laterality_key: The sample key holding the image's laterality.
    """

    def __init__(self, keys: KeysCollection, canonical: str, laterality_key: str = "laterality") -> None:
        super().__init__(keys)
        self.canonical = canonical
        self.laterality_key = laterality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        side = str(d.get(self.laterality_key) or "").upper()
        if side and side != self.canonical:
            for key in self.key_iterator(d):
                d[key] = self._mirror(d[key])
        return d

    @staticmethod
    def _mirror(img: Any) -> Any:
        """Mirror columns (x); a MetaTensor's affine is updated so the pixels keep their place in space."""
        flipped = torch.flip(img, dims=(1,))
        if isinstance(img, MetaTensor) and isinstance(flipped, MetaTensor):
            n = img.shape[1]
            mirror = torch.eye(4, dtype=torch.float64)
            mirror[0, 0], mirror[0, 3] = -1.0, float(n - 1)  # new index x' holds old index n-1-x'
            flipped.affine = img.affine.to(torch.float64) @ mirror
        return flipped


class RobustScaled(MapTransform):
    """Percentile-based intensity normalisation over the foreground.

    ``zscore`` mode clips to the percentiles and centres on the foreground mean with unit standard
    deviation (robust z-score for MR); ``range`` mode maps the percentiles to [0, 1] (mammography).
    The foreground is every voxel above the image minimum, so padding and air do not skew it.

    Args:
        keys: Image keys.
        lower: Lower percentile.
        upper: Upper percentile.
        mode: ``"zscore"`` or ``"range"``.
    """

    def __init__(self, keys: KeysCollection, lower: float, upper: float, mode: str) -> None:
        super().__init__(keys)
        if mode not in ("zscore", "range"):
            raise ValueError(f"RobustScaled mode must be 'zscore' or 'range', got {mode!r}")
        self.lower, self.upper, self.mode = lower, upper, mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            fg = img[img > img.min()]
            if fg.numel() < 16:
                fg = img.flatten()
            q = torch.quantile(fg.float()[:: max(1, fg.numel() // 1_000_000)],
                               torch.tensor([self.lower / 100, self.upper / 100]))
            lo, hi = float(q[0]), float(q[1])
            clipped = img.clamp(lo, hi)
            if self.mode == "range":
                d[key] = (clipped - lo) / max(hi - lo, 1e-6)
            else:
                inside = fg.clamp(lo, hi)
                d[key] = (clipped - inside.mean()) / max(float(inside.std()), 1e-6)
        return d


LUNG_BALL_MM = 22.0  # the lung field's rolling ball: dents up to about this radius (juxtapleural nodules) are kept
BODY_SEAL_MM = 12.0  # gaps in the body's wall up to about twice this are sealed before the lungs are told from air


def _in_plane_spacing(img: Any) -> tuple[float, float]:
    """A volume's voxel size along its first two axes in mm (1 mm where it carries no affine)."""
    affine = getattr(img, "affine", None)
    if affine is None:
        return 1.0, 1.0
    a = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
    return float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))


def _closed(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary closing with room around the mask (no erosion from the array's edge)."""
    from scipy import ndimage

    pad = max(structure.shape)
    return np.asarray(ndimage.binary_closing(np.pad(mask, pad), structure=structure)[pad:-pad, pad:-pad])


def _disk(radius_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """A filled ellipse of ``radius_mm`` on a grid of ``spacing``: a ball's section, as a structuring element."""
    rx, ry = max(1, int(radius_mm / spacing[0])), max(1, int(radius_mm / spacing[1]))
    x = np.arange(-rx, rx + 1)[:, None] * spacing[0]
    y = np.arange(-ry, ry + 1)[None, :] * spacing[1]
    return np.asarray(x**2 + y**2 < radius_mm**2)  # strictly: no lone voxels at the tips of the axes


class LungFieldd(MapTransform):
    """Keep the lung fields of a chest CT and set everything else to air (a lung-CAD preprocessing step).

    In each axial slice, aerated lung is air-like tissue (below ``threshold`` HU) that is not part of the air
    around the patient: the regions outside the body (gaps in its wall up to about 24 mm sealed) that hold a
    corner of the slice. The lungs are then closed with a rolling ball of ``ball_mm`` and their holes
    filled, so vessels and nodules inside them are kept, and so is a nodule fused with the pleura (a dent
    in the air mask narrower than the ball). Outside the fields every voxel becomes ``fill`` HU. With the
    chest wall, heart and spine gone, the brightest things a network sees are vessels and nodules.

    Measured on the synthetic consortium's 73 nodules at 5.5 mm: the earlier form of this step (outside
    air found in 3D, a 3-voxel closing) cut more than half of 7 nodules, most of them whole, because a
    chest wall thinned by partial volume in one slice joined a lung to the outside air; this form cuts
    more than half of 1 (a body wider than the field of view, the lung open at the image's edge) and
    0.04 of a nodule's voxels on average, mostly its rim on the pleura. The known limits: the voxel on
    the pleural line under a juxtapleural nodule, a nodule larger than the ball, and where the lungs come
    closer than the ball's width the tissue between them stays.

    Args:
        keys: Image keys (HU volumes, channel first, slices on the last axis after RAS orientation).
        threshold: HU below which tissue counts as aerated.
        fill: HU written outside the lung fields.
        ball_mm: The rolling ball's radius in mm (from the volume's affine; 1 mm voxels without one).
    """

    def __init__(self, keys: KeysCollection, threshold: float = -400.0, fill: float = -1000.0,
                 ball_mm: float = LUNG_BALL_MM) -> None:
        super().__init__(keys)
        self.threshold, self.fill, self.ball_mm = threshold, fill, ball_mm

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy import ndimage

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            volume = np.asarray(img[0].detach().cpu().numpy() if hasattr(img, "detach") else img[0])
            air = volume < self.threshold
            spacing = _in_plane_spacing(img)
            ball, seal = _disk(self.ball_mm, spacing), _disk(BODY_SEAL_MM, spacing)
            field_ = np.zeros_like(air)
            for k in range(air.shape[-1]):
                # The air around the patient: the regions outside the body (its wall's gaps sealed) that hold a
                # corner of the slice. Air elsewhere is lung, slice by slice: a chest wall thinned by partial
                # volume in one slice, or a body wider than the field of view, cannot make a lung count as outside.
                outside, _ = ndimage.label(~_closed(~air[..., k], seal))
                corners = {outside[0, 0], outside[0, -1], outside[-1, 0], outside[-1, -1]} - {0}
                lungs = air[..., k] & ~np.isin(outside, list(corners))
                # Rolling-ball closing: a nodule on the pleura is a dent in the air mask, filled like a hole (and
                # where the lungs come closer than the ball's width, the tissue between them stays too).
                field_[..., k] = ndimage.binary_fill_holes(_closed(lungs, ball))
            if not field_.any():  # no lungs found: leave the image as it is rather than blank it
                continue
            mask = torch.as_tensor(field_, device=img.device)[None]
            d[key] = torch.where(mask, img, torch.full_like(img, self.fill))
        return d


class FindPectorald(MapTransform):
    """Find the pectoral muscle of an MLO mammogram (a mammography-CAD step), for :class:`RemovePectorald`.

    The muscle is a straight edge from the top of the image to the chest wall with a bright triangle behind it
    (:func:`imaging.pectoral.find_pectoral`); what is denser than the muscle inside the triangle (a mass over it)
    is not part of it. Views whose ViewPosition names no oblique or lateral projection (CC, XCCL, ...) are left
    alone; an image without the tag is searched, and one where no such edge stands out gets no mask.

    Runs before intensity scaling, on the resampled image's own values (where a mass is still denser than the
    muscle); the muscle is removed after scaling, so that it stays in the percentiles the breast is scaled by, an
    internal reference of density. Removed before scaling, the densest normal tissue of a negative image was
    stretched to the brightness of a mass: validation AUROC 0.76 against 0.91 without the step, and the Grad-CAM
    pointing game fell from 85 % to 61 % (BENCHMARKS.md).

    Args:
        keys: Image keys (2D, ``(1, columns, rows)``).
        view_key: The sample key holding the image's ViewPosition.
        mask_key: Where the muscle's mask goes (None: no muscle found).
    """

    _OBLIQUE = ("MLO", "ML", "LM", "LMO", "SIO", "FB")

    def __init__(self, keys: KeysCollection, view_key: str = "view", mask_key: str = "pectoral") -> None:
        super().__init__(keys)
        self.view_key, self.mask_key = view_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from imaging.pectoral import find_pectoral, pectoral_mask

        d = dict(data)
        d[self.mask_key] = None
        view = str(d.get(self.view_key) or "").upper()
        if view and view not in self._OBLIQUE:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            plane = np.asarray(img[0].detach().cpu().numpy() if hasattr(img, "detach") else img[0])
            line = find_pectoral(plane)
            if line is not None:
                d[self.mask_key] = torch.as_tensor(pectoral_mask(plane, line), device=img.device)[None]
        return d


class RemovePectorald(MapTransform):
    """Set the pectoral muscle :class:`FindPectorald` found to the image's minimum (after intensity scaling).

    Args:
        keys: Image keys.
        mask_key: The key :class:`FindPectorald` wrote; it is dropped.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "pectoral") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = d.pop(self.mask_key, None)
        if mask is None:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            d[key] = torch.where(mask.to(img.device), torch.full_like(img, float(img.min())), img)
        return d


def calcification_footprint(size: int) -> np.ndarray:
    """The disk of ``size`` pixels across (an even size has no centre pixel: the disk about the middle of its four)
    that :class:`EnhanceCalcificationsd` opens the image with."""
    if size < 2:
        raise ValueError(f"a calcification footprint needs at least 2 pixels, got {size}")
    c = (size - 1) / 2
    i, j = np.ogrid[:size, :size]
    return (i - c) ** 2 + (j - c) ** 2 <= (size / 2) ** 2


class EnhanceCalcificationsd(MapTransform):
    """Add ``gain`` times the image's white top-hat (the image minus its grey opening by a disk of ``size`` pixels):
    the bright detail narrower than the disk, which in a mammogram is calcifications, the skin line and the thinnest
    tissue strands. Run after intensity scaling.

    Why: calcifications are specks of about a pixel at 0.8 mm, as bright as the densest tissue around them once the
    image is scaled to its percentiles (there they differ by about 0.1), so the network learned masses and read
    dense tissue for calcification clusters (its saliency maps peaked 17-49 pixels away from 18 of 20 clusters;
    BENCHMARKS.md, "Calcifications"). The top-hat is the classic first step of microcalcification detection: a
    speck keeps its full height, smooth tissue none. Works channel by channel on 2D images.

    Args:
        keys: Image keys.
        gain: How much of the top-hat to add.
        size: The disk's diameter in pixels (:func:`calcification_footprint`).
    """

    def __init__(self, keys: KeysCollection, gain: float, size: int) -> None:
        super().__init__(keys)
        self.gain = float(gain)
        self.footprint = calcification_footprint(int(size))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy import ndimage

        d = dict(data)
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key])
            if img.ndim != 3:
                raise ValueError(f"{key}: calcification enhancement works on 2D images (channel, rows, cols); "
                                 f"got {tuple(img.shape)}")
            planes = img.detach().cpu().numpy()
            hat = np.stack([ndimage.white_tophat(p, footprint=self.footprint) for p in planes])
            d[key] = img + self.gain * torch.as_tensor(hat, dtype=img.dtype, device=img.device)
        return d


FAT_BELOW_HU = -30.0  # no fat peak reads above this, however drifted: above it lies soft tissue


def fat_peak_hu(volume: np.ndarray, *, window: tuple[float, float] = (-160.0, -40.0),
                histogram: tuple[float, float] = (-250.0, 150.0), min_voxels: int = 500, bin_hu: float = 2.0,
                smooth_hu: float = 8.0) -> float | None:
    """The Hounsfield value of a CT scan's adipose-tissue peak, or None when the scan shows no fat to read.

    Over ``histogram``'s range a chest or abdominal CT's histogram (smoothed over ``smooth_hu``) has two tissue
    peaks: fat (about -100 HU) and soft tissue (muscle, organs, 20-60 HU). The peak taken is the most prominent
    local maximum whose centre lies in ``window`` (where fat can be, drifted as far as the caller allows; its top
    stays below soft tissue), of those at least a tenth of the highest and as prominent. None when fewer than
    ``min_voxels`` voxels lie in the range, or no such peak lies in the window (a scan of water and soft tissue
    alone, or one drifted further than the window allows).

    Fat is the one tissue every such scan holds in bulk (subcutaneous and visceral) whose density hardly varies
    between patients; air outside the body is no reference in practice, because scanners pad outside the
    reconstruction circle with -1024 HU, the very value air should read.
    """
    from scipy import ndimage, signal

    lo, hi = histogram
    values = volume[(volume >= lo) & (volume <= hi)]
    if values.size < min_voxels:
        return None
    counts, edges = np.histogram(values, bins=int(round((hi - lo) / bin_hu)), range=(lo, hi))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), smooth_hu / bin_hu, mode="constant")
    top = float(smooth.max())
    peaks, props = signal.find_peaks(smooth, height=0.1 * top, prominence=0.1 * top)
    centres = (edges[peaks] + edges[peaks + 1]) / 2
    inside = (centres >= window[0]) & (centres <= window[1])
    if not inside.any():
        return None
    return float(centres[inside][int(np.argmax(props["prominences"][inside]))])


class CalibrateHUd(MapTransform):
    """Per-scan CT calibration: shift a scan's Hounsfield units so that its fat peak reads ``reference`` HU.

    A CT scanner's calibration drifts between services and differs between vendors and tube voltages by tens of
    HU (water and soft tissue are checked daily against ±4-5 HU, but the drift in patients' tissue is larger),
    and every fixed-HU step that follows (window, bright-structure threshold) reads a drifted scan wrongly. Shifting
    each scan so that its fat peak (:func:`fat_peak_hu`) reads the same value takes the offset out, scan by scan,
    at the site, with no reference phantom. A shift larger than ``max_shift`` is not drift but a scan with
    too little fat to read (or another body region): it is left as it is, like a scan with no fat at all.

    On the synthetic consortium's non-IID variant (one site's CT +35 HU off, with twice the noise), the drift
    lifted that site's enhancing tumours over the bright-structure threshold, which erased 60 % of their voxels
    (2.6 % with this step and the median of :class:`SuppressBrightd`), and federated training went from chance to
    held-out AUROC 0.79 with it (BENCHMARKS.md, "The non-IID variant").

    Args:
        keys: Image keys (HU volumes, after resampling).
        reference: The HU the fat peak is moved to.
        max_shift: The largest shift applied, in HU.
    """

    def __init__(self, keys: KeysCollection, reference: float = -100.0, max_shift: float = FAT_MAX_SHIFT_HU) -> None:
        super().__init__(keys)
        self.reference, self.max_shift = reference, max_shift

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        window = (self.reference - self.max_shift, min(self.reference + self.max_shift, FAT_BELOW_HU))
        for key in self.key_iterator(d):
            img = d[key]
            volume = np.asarray(img[0].detach().cpu().numpy() if hasattr(img, "detach") else img[0])
            peak = fat_peak_hu(volume, window=window)
            if peak is None:
                continue
            d[key] = img + (self.reference - peak)
        return d


class SuppressBrightd(MapTransform):
    """Replace bone and enhancing organs (above ``threshold`` HU) and their partial-volume rim by ``fill`` HU.

    The bone-removal step of abdominal CT CAD: after it the brightest soft tissue left is what enhances
    like a tumour (colorectal cancers enhance to about 80-130 HU in the portal-venous phase), not the
    spine, pelvis or kidney cortex. Without it the compact network, which must also work under DP-SGD
    with per-image normalisation, could not tell a colonic mass from the rims of bright structures on
    131 synthetic training volumes (validation AUROC near 0.5); with it, 0.7-0.9 in 12 epochs. A tumour
    with calcification or hyper-enhancing above ``threshold`` would be cut: the known limit of this step.

    Args:
        keys: Image keys (HU volumes, after resampling).
        threshold: HU above which a voxel is suppressed.
        fill: HU written in its place (fat).
        dilate: Voxels of partial-volume rim suppressed around each bright structure.
        median: The threshold reads the volume through a median filter of this width (voxels; 1: none), so that
            image noise does not punch holes into a tumour (on a site with 40 HU of noise and a 35 HU drift, 2.6 %
            of the tumours' voxels are erased with the calibration and a median of 3, against 60 % before:
            ``scripts/bench_preprocessing.py``), while bone and kidneys, larger than the filter, go whole.
        bone: Above this HU a voxel is suppressed whatever the median reads: bone thinner than the median (a rib
            or a cortex one voxel thick) would pass it, and no enhancing tumour or noise reaches it.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 160.0, fill: float = SUPPRESS_FILL_HU, dilate: int = 1,
                 median: int = BRIGHT_MEDIAN, bone: float = BONE_HU) -> None:
        super().__init__(keys)
        self.threshold, self.fill, self.dilate, self.median, self.bone = threshold, fill, dilate, median, bone

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from scipy import ndimage

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            volume = np.asarray(img[0].detach().cpu().numpy() if hasattr(img, "detach") else img[0])
            bright = (ndimage.median_filter(volume, self.median) if self.median > 1 else volume) > self.threshold
            bright |= volume > self.bone  # bone thinner than the median (ribs, cortex): no tumour or noise is there
            if self.dilate:
                bright = ndimage.binary_dilation(bright, iterations=self.dilate)
            mask = torch.as_tensor(bright, device=img.device)[None]
            d[key] = torch.where(mask, torch.full_like(img, self.fill), img)
        return d


def deterministic_transforms(preset: TaskPreset, *, keys: tuple[str, ...] = ("image",)) -> list[Transform]:
    """Load, orient, resample, normalise and crop/pad: the cached part of the pipeline. For a segmentation preset
    the ``mask`` key is loaded too and follows every geometric step (nearest neighbour), no intensity step."""
    geo: tuple[str, ...] = (*keys, "mask") if preset.segmentation else keys
    modes = tuple("nearest" if k == "mask" else "bilinear" for k in geo)
    pads = tuple("zeros" if k == "mask" else "border" for k in geo)
    steps: list[Transform] = [LoadMaskd(["mask"], plan_key=keys[0])] if preset.segmentation else []
    steps.append(LoadPlanImaged(keys))
    if preset.spatial_dims == 3:
        steps.append(Orientationd(geo, axcodes="RAS", labels=None))
    if preset.canonical_laterality:
        steps.append(FlipToLateralityd(geo, preset.canonical_laterality))
    steps.append(Spacingd(geo, pixdim=preset.target_spacing, mode=modes, padding_mode=pads))
    if preset.lung_field:
        steps.append(LungFieldd(keys))
    if preset.remove_pectoral:
        steps.append(FindPectorald(keys))
    if preset.fat_reference_hu is not None:
        steps.append(CalibrateHUd(keys, reference=preset.fat_reference_hu))
    if preset.suppress_above_hu is not None:
        steps.append(SuppressBrightd(keys, threshold=preset.suppress_above_hu))
    if preset.intensity is Intensity.CT_WINDOW:
        if preset.window is None:
            raise ValueError(f"preset {preset.name}: a CT window is required for {preset.intensity}")
        lo, hi = preset.window
        steps.append(ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    elif preset.intensity is Intensity.MR_ZSCORE:
        steps.append(RobustScaled(keys, *preset.percentiles, mode="zscore"))
    else:
        steps.append(RobustScaled(keys, *preset.percentiles, mode="range"))
    if preset.remove_pectoral:
        steps.append(RemovePectorald(keys))
    if preset.calcification_gain:
        steps.append(EnhanceCalcificationsd(keys, preset.calcification_gain, preset.calcification_size))
    steps.append(ResizeWithPadOrCropd(geo, spatial_size=preset.spatial_size, mode="constant"))
    steps.append(EnsureTyped(geo, dtype=torch.float32, track_meta=False))
    return steps


def _geometric_steps(preset: TaskPreset, key: str, *, mode: str) -> list[Transform]:
    """The steps of :func:`deterministic_transforms` that move voxels (not their values), for one key."""
    steps: list[Transform] = []
    if preset.spatial_dims == 3:
        steps.append(Orientationd([key], axcodes="RAS", labels=None))
    if preset.canonical_laterality:
        steps.append(FlipToLateralityd([key], preset.canonical_laterality))
    steps.append(Spacingd([key], pixdim=preset.target_spacing, mode=mode, padding_mode="zeros"))
    steps.append(ResizeWithPadOrCropd([key], spatial_size=preset.spatial_size, mode="constant"))
    return steps


def mask_to_network_grid(mask: np.ndarray, plan: ImagePlan, preset: TaskPreset) -> np.ndarray:
    """A mask drawn on an image's DICOM grid (``(slices, rows, cols)`` or ``(rows, cols)``), carried through
    the same geometric steps as the image (orientation, laterality mirror, resampling with nearest
    neighbour, crop/pad) onto the grid the network sees. For checking saliency maps against lesions."""
    d: dict[Hashable, Any] = {"mask": to_meta_tensor(mask.astype(np.float32), plan), "laterality": plan.laterality}
    out = Compose(_geometric_steps(preset, "mask", mode="nearest"))(d)["mask"]
    return np.asarray(out[0].detach().cpu().numpy() if hasattr(out, "detach") else out[0]) > 0.5


def network_to_source_index(plan: ImagePlan, preset: TaskPreset) -> np.ndarray:
    """The 4x4 matrix from voxel indices of the network's grid to ``(col, row, slice)`` indices of the
    DICOM image: the geometric steps (orientation, laterality mirror, resampling, crop/pad) undone.

    The steps run once on an empty image of the source's size with MONAI's affine tracking; the
    matrix is ``source_affine⁻¹ · network_affine``.
    """
    empty = to_meta_tensor(np.zeros(plan.shape, np.float32), plan)
    d: dict[Hashable, Any] = {"image": empty, "laterality": plan.laterality}
    out = Compose(_geometric_steps(preset, "image", mode="nearest"))(d)["image"]
    source = np.asarray(empty.affine, np.float64)
    network = np.asarray(out.affine, np.float64)
    return np.linalg.inv(source) @ network


def network_to_source(volume: np.ndarray, plan: ImagePlan, preset: TaskPreset) -> np.ndarray:
    """A map on the network's grid (``(x, y[, z])``, as saliency returns it) resampled onto the DICOM
    image's grid, ``(slices, rows, cols)`` or ``(rows, cols)``, with linear interpolation; voxels the
    network never saw (cropped away) are 0. The inverse of :func:`mask_to_network_grid`'s mapping.
    """
    from scipy import ndimage

    to_source = network_to_source_index(plan, preset)
    to_network = np.linalg.inv(to_source)
    dims = plan.spatial_dims
    if dims == 3:
        slices, rows, cols = plan.shape
        grid = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), np.arange(slices), indexing="ij"), 0)
    else:
        rows, cols = plan.shape
        grid = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), indexing="ij"), 0)
        grid = np.concatenate([grid, np.zeros_like(grid[:1])], 0)
    points = grid.reshape(3, -1).astype(np.float64)
    mapped = to_network[:3, :3] @ points + to_network[:3, 3:4]
    values = ndimage.map_coordinates(np.asarray(volume, np.float32), mapped[:dims], order=1, mode="constant",
                                     cval=0.0).reshape(grid.shape[1:])
    return np.ascontiguousarray(values.T).astype(np.float32)  # (x, y[, z]) -> (slices, rows, cols) / (rows, cols)


def augmentations(preset: TaskPreset, *, keys: tuple[str, ...] = ("image",)) -> list[Transform]:
    """The preset's random training augmentations. A segmentation preset first crops a patch of
    ``preset.patch_size`` centred on lesion and background voxels alike (MONAI's ``RandCropByPosNegLabeld``, one
    patch per image per epoch: a list of one sample), then moves image and mask together (mask: nearest)."""
    a = preset.augment
    geo: tuple[str, ...] = (*keys, "mask") if preset.segmentation else keys
    modes = tuple("nearest" if k == "mask" else "bilinear" for k in geo)
    steps: list[Transform] = []
    size = tuple(preset.spatial_size)
    if preset.segmentation and preset.patch_size and tuple(preset.patch_size) != tuple(preset.spatial_size):
        steps.append(RandCropByPosNegLabeld(geo, label_key="mask", spatial_size=preset.patch_size, pos=1.0, neg=1.0,
                                            num_samples=1, allow_smaller=True))
        size = tuple(preset.patch_size)
    steps += [RandFlipd(geo, prob=0.5, spatial_axis=axis) for axis in a.flip_axes]
    if a.rotate_deg or a.zoom:
        rad = float(np.radians(a.rotate_deg))
        rotate = (rad,) if preset.spatial_dims == 2 else (0.0, 0.0, rad)  # in-plane rotation for volumes
        steps.append(
            # The input size is fixed by the preset (or the patch): the sampling grid is built once, not per image
            # (a quarter of the transform's time on a 64×64×32 volume).
            RandAffined(geo, prob=0.5, rotate_range=rotate, scale_range=(a.zoom,) * preset.spatial_dims,
                        mode=modes, padding_mode="zeros", spatial_size=size, cache_grid=True)
        )
    if a.intensity_scale:
        steps.append(RandScaleIntensityd(keys, factors=a.intensity_scale, prob=0.5))
    if a.intensity_shift:
        steps.append(RandShiftIntensityd(keys, offsets=a.intensity_shift, prob=0.5))
    if a.noise_std:
        steps.append(RandGaussianNoised(keys, prob=0.3, std=a.noise_std))
    return steps


def pipeline(preset: TaskPreset, *, train: bool) -> Compose:
    """The full pipeline of a preset: deterministic steps, then augmentations when training."""
    return Compose(deterministic_transforms(preset) + (augmentations(preset) if train else []))
