"""Saliency maps of a model on one image: Grad-CAM, Grad-CAM++ (MONAI ``monai.visualize``) and occlusion
sensitivity, for 2D and 3D through one code path.

The Grad-CAM layer is found for each network, not named per call: the deepest module whose output is
still a spatial map of at least ``min_size`` voxels along every axis. A map read at a 1×1 (or 2×2)
layer is a constant and says nothing (MONAI's DenseNet121 at 64²: ``class_layers.relu`` is 2×2), so
the rule picks ``features`` (the last convolution block) of the compact CNN and the third dense block
of a DenseNet at the presets' sizes.

Maps are returned at the input's spatial size, scaled to [0, 1] (1: what pushed the score up most).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn


class Method(StrEnum):
    """Saliency methods."""

    GRADCAM = "gradcam"
    GRADCAMPP = "gradcampp"
    OCCLUSION = "occlusion"


class SaliencyError(ValueError):
    """The network has no layer a saliency map can be read from, or a bad request; the message says why."""


def target_layer(model: nn.Module, input_shape: Sequence[int], *, min_size: int | None = None) -> str:
    """The name of the deepest module whose output is a spatial map at least ``min_size`` along every axis.

    Args:
        model: The network (in eval mode or not; it is run once on zeros without gradients).
        input_shape: ``(channels, *spatial)`` of one input.
        min_size: Smallest useful map size per axis (default: 1/16 of the smallest input axis, at least 4).

    Raises:
        SaliencyError: No module qualifies.
    """
    spatial_dims = len(input_shape) - 1
    min_size = min_size or max(4, min(input_shape[1:]) // 16)
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == spatial_dims + 2:
                seen.append((name, tuple(out.shape[2:])))

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # Forward hooks fire when a module finishes: the last qualifying one is the deepest map.
    good = [name for name, size in seen if min(size) >= min_size]
    if not good:
        sizes = ", ".join(f"{n} {s}" for n, s in seen[-5:])
        raise SaliencyError(f"no layer of {type(model).__name__} keeps a spatial map of {min_size} or more per axis "
                            f"at input {tuple(input_shape)} (last maps: {sizes}); use a larger input")
    return good[-1]


def _scaled(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(m.astype(np.float32))
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@dataclass(frozen=True)
class Saliency:
    """One image's map, the model's probability, and how it was made."""

    map: np.ndarray  # spatial, float32 in [0, 1]
    probability: float
    method: Method
    layer: str | None
    seconds: float


def occlusion_mask(spatial: Sequence[int], mask_size: int | None = None) -> tuple[int, ...]:
    """The occlusion patch per axis: ``mask_size`` or 1/8 of each axis in 2D, 1/4 in 3D (at least 4)."""
    if mask_size:
        return tuple(min(mask_size, s) for s in spatial)
    div = 8 if len(spatial) == 2 else 4
    return tuple(max(4, s // div) for s in spatial)


def region_box(image: torch.Tensor) -> list[tuple[int, int]]:
    """Per spatial axis, ``(start, stop)`` of the voxels above the image's background (minimum) value."""
    x = image[0].detach().cpu().numpy() if image.ndim > 1 else image.detach().cpu().numpy()
    fg = x > float(x.min()) + 1e-6
    if not fg.any():
        return [(0, s) for s in x.shape]
    box = []
    for axis in range(x.ndim):
        other = tuple(a for a in range(x.ndim) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def occlusion_windows(spatial: Sequence[int], mask: Sequence[int], overlap: float) -> int:
    """How many occluded copies of the image the occlusion map needs (its cost in forward passes)."""
    total = 1
    for s, m in zip(spatial, mask, strict=True):
        step = max(1, int(round(m * (1 - overlap))))
        total *= max(1, math.ceil((s - m) / step) + 1)
    return total


def saliency(model: nn.Module, image: torch.Tensor, method: Method | str = Method.GRADCAM, *,
             layer: str | None = None, mask_size: int | None = None, overlap: float = 0.5,
             n_batch: int = 16) -> Saliency:
    """The saliency map of ``model``'s positive-class logit on one image.

    Args:
        model: A network mapping ``(batch, channels, *spatial)`` to one logit per image.
        image: ``(channels, *spatial)``.
        method: Grad-CAM, Grad-CAM++ or occlusion sensitivity.
        layer: Grad-CAM layer (default: :func:`target_layer`).
        mask_size: Occlusion patch edge in voxels (default: 1/8 of each axis in 2D, 1/4 in 3D, at least 4).
        overlap: Occlusion patch overlap.
        n_batch: Occluded images per forward pass.

    Occlusion is restricted to the image's region (the bounding box of voxels above the background
    value, e.g. the lung fields after the lung preset): outside it the map is 0.
    """
    import warnings

    from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity

    warnings.filterwarnings("ignore", message=".*non-tuple sequence for multidimensional indexing.*")
    warnings.filterwarnings("ignore", message=".*retain_graph.*")
    method = Method(method)
    model.eval()
    x = image.unsqueeze(0).float()
    if method in (Method.GRADCAM, Method.GRADCAMPP):
        layer = layer or target_layer(model, tuple(image.shape))
        t0 = time.perf_counter()
        cam_cls = GradCAM if method == Method.GRADCAM else GradCAMpp
        # MONAI's default post-processing maps (min, max) to (1, 0): it flips the map. Keep it raw and scale here.
        cam = cam_cls(nn_module=model, target_layers=layer, postprocessing=lambda m: m)
        out = cam(x=x, class_idx=0)
        result = out[0, 0].detach().cpu().numpy()
        score = cam.nn_module.score  # the logit the map explains, from the same forward pass
        logit = float(score.detach().reshape(-1)[0]) if score is not None else float(model(x).reshape(-1)[0])
        probability = 1.0 / (1.0 + math.exp(-logit))
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            logit = float(model(x).reshape(-1)[0])
        probability = 1.0 / (1.0 + math.exp(-logit))
        spatial = tuple(int(v) for v in image.shape[1:])
        size = occlusion_mask(spatial, mask_size)
        box = region_box(image)
        occ = OcclusionSensitivity(nn_module=model, mask_size=size, n_batch=n_batch, verbose=False,
                                   mode="mean_img", overlap=overlap, activate=False)
        with torch.no_grad():
            occ_map, _ = occ(x, b_box=[v for lo, hi in box for v in (lo, hi - 1)])
        # How much the logit drops when a region is hidden: what supported the positive score.
        inside = np.clip(logit - occ_map[0, 0].detach().cpu().numpy(), 0, None)
        result = np.zeros(spatial, np.float32)
        result[tuple(slice(lo, lo + n) for (lo, _), n in zip(box, inside.shape, strict=True))] = inside
        layer = None
    return Saliency(_scaled(result), probability, method, layer, time.perf_counter() - t0)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (the model-randomisation sanity check's figure)."""
    ra = np.argsort(np.argsort(a.ravel())).astype(np.float64)
    rb = np.argsort(np.argsort(b.ravel())).astype(np.float64)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom else 0.0


def pointing_game(saliency_map: np.ndarray, lesion: np.ndarray, *, margin: int = 1) -> bool:
    """Is the map's peak inside the lesion mask (dilated by ``margin`` voxels)?"""
    from scipy import ndimage

    mask = lesion.astype(bool)
    if margin:
        mask = ndimage.binary_dilation(mask, iterations=margin)
    peak = np.unravel_index(int(np.argmax(saliency_map)), saliency_map.shape)
    return bool(mask[peak])


def energy_inside(saliency_map: np.ndarray, lesion: np.ndarray) -> float:
    """Share of the map's total value that lies inside the lesion mask."""
    total = float(saliency_map.sum())
    return float(saliency_map[lesion.astype(bool)].sum() / total) if total > 0 else 0.0
