"""Saliency maps of a model on one image: Grad-CAM, Grad-CAM++ (MONAI ``monai.visualize``), HiResCAM and occlusion
sensitivity, for 2D and 3D through one code path.

HiResCAM (Draelos & Carin 2020) multiplies each unit's activation by the logit's gradient there, element by element,
and sums over channels; Grad-CAM first averages the gradient over the whole map, so a channel that pays for a lesion
lights up wherever it is active. At the layer the pooling reads, the HiResCAM map sums to the logit less the head's
bias (the generalised mean is homogeneous of degree one). It is read at the network's finest layer
(:func:`detail_layer`: the compact CNN's first block, on the input's own grid), where the map is no such sum but a
first-order account of which voxels' features carried the score; that layer's features also respond to bright
structures in a network with random weights, so its map passes the model-randomisation check less well than
Grad-CAM's. Which task shows which map first: :mod:`models.methods` (HiResCAM for prostate MR, where Grad-CAM's peak
sat beside the lesion, at the bladder, and for colorectal CT, where it hit as many tumours or more on every model
measured; BENCHMARKS.md, "Saliency").

The Grad-CAM layer is found for each network, not named per call: the deepest module whose output is
still a spatial map of at least ``min_size`` voxels along every axis. A map read at a 1×1 (or 2×2)
layer is a constant and says nothing (MONAI's DenseNet121 at 64²: ``class_layers.relu`` is 2×2), so
the rule picks ``features`` (the last convolution block) of the compact CNN and the third dense block
of a DenseNet at the presets' sizes.

Maps are returned at the input's spatial size, scaled to [0, 1] (1: what pushed the score up most).

A layer's map is brought to the input's size by placing each of its units at the centre of its
receptive field (:func:`layer_grid`), not by stretching the map over the image: for convolutions with
stride 2 and padding 1, unit ``i`` looks at input voxel ``4i`` two stages down, while plain
interpolation (``align_corners=False``) puts it at ``4i + 1.5``. That 1.5-voxel shift per axis moved
Grad-CAM's peak off small lesions (measured: the peak sat 1.4-2.8 voxels beside nodules it had found).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.methods import Method

__all__ = [
    "Method",
    "Saliency",
    "SaliencyError",
    "aligned_upsampler",
    "detail_layer",
    "energy_inside",
    "layer_grid",
    "method_layer",
    "occlusion_mask",
    "occlusion_windows",
    "pointing_game",
    "rank_correlation",
    "region_box",
    "saliency",
    "target_layer",
    "unit_contributions",
]


class SaliencyError(ValueError):
    """The network has no layer a saliency map can be read from, or a bad request; the message says why."""


def _module_maps(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """Every named module whose output is a spatial map, with its size, in the order the modules finish on one
    forward pass of zeros (no gradients; the model's mode is restored); modules run more than once are left out."""
    spatial_dims = len(input_shape) - 1
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.ndim == spatial_dims + 2:
                seen.append((name, tuple(out.shape[2:])))

        hooks.append(module.register_forward_hook(hook))
    calls: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    # A module run more than once per pass (one ReLU reused) has no one map to read.
    return [(name, size) for name, size in seen if calls[name] == 1]


def target_layer(model: nn.Module, input_shape: Sequence[int], *, min_size: int | None = None) -> str:
    """The name of the deepest module whose output is a spatial map at least ``min_size`` along every axis.

    Args:
        model: The network (in eval mode or not; it is run once on zeros without gradients).
        input_shape: ``(channels, *spatial)`` of one input.
        min_size: Smallest useful map size per axis (default: 1/16 of the smallest input axis, at least 4).

    Raises:
        SaliencyError: No module qualifies.
    """
    min_size = min_size or max(4, min(input_shape[1:]) // 16)
    seen = _module_maps(model, input_shape)
    # Forward hooks fire when a module finishes: the last qualifying one is the deepest map.
    good = [name for name, size in seen if min(size) >= min_size]
    if not good:
        sizes = ", ".join(f"{n} {s}" for n, s in seen[-5:])
        raise SaliencyError(f"no layer of {type(model).__name__} keeps a spatial map of {min_size} or more per axis "
                            f"at input {tuple(input_shape)} (last maps: {sizes}); use a larger input")
    return good[-1]


def detail_layer(model: nn.Module, input_shape: Sequence[int]) -> str:
    """The name of the deepest module whose output is at the network's finest spatial grid (HiResCAM's layer): for
    the compact CNN its first block, at the input's own grid; for a network that downsamples at once, its first stage.

    Raises:
        SaliencyError: No module outputs a spatial map.
    """
    seen = _module_maps(model, input_shape)
    if not seen:
        raise SaliencyError(f"no layer of {type(model).__name__} outputs a spatial map at input {tuple(input_shape)}")
    finest = max(math.prod(size) for _, size in seen)
    # The finest grid's last module before the first downsampling: later modules at that size (a decoder's) do not
    # count, so stop at the first smaller map.
    name = None
    for module_name, size in seen:
        if math.prod(size) == finest:
            name = module_name
        elif name is not None:
            break
    assert name is not None
    return name


def method_layer(model: nn.Module, method: Method | str, input_shape: Sequence[int]) -> str | None:
    """The layer ``method`` reads on ``model`` (None for occlusion, which reads none): :func:`target_layer` for
    Grad-CAM and Grad-CAM++, :func:`detail_layer` for HiResCAM."""
    method = Method(method)
    if method == Method.OCCLUSION:
        return None
    if method == Method.HIRESCAM:
        return detail_layer(model, input_shape)
    return target_layer(model, input_shape)


def layer_grid(model: nn.Module, layer: str, input_shape: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """Where a layer's units sit on the input: per spatial axis ``(scale, offset)`` so that unit ``i`` is
    centred on input voxel ``scale * i + offset``.

    Found from the network itself: the gradient of two neighbouring interior units with respect to
    the input is non-zero exactly on their receptive fields (whatever the weights), whose centres give
    the step and the offset. Normalisation layers are taken out first (instance and group norms mix
    every position into every unit through their statistics; they move nothing). Works for any stack
    of convolutions and pooling, 2D or 3D.
    """
    import copy

    model = copy.deepcopy(model)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
    for child in list(model.modules()):
        for child_name, grandchild in list(child.named_children()):
            if isinstance(grandchild, norms):
                setattr(child, child_name, nn.Identity())
    module = dict(model.named_modules())[layer]
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    model.eval()
    try:
        x = (torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)) + 0.5)
        x = x.to(_device_of(model)).requires_grad_(True)
        model(x)
        act = store["a"]
        size = act.shape[2:]
        out: list[tuple[float, float]] = []
        centres = []
        for step in (0, 1):
            unit = act[0, :]
            for n in size:  # one interior unit (all channels), then its neighbour along every axis
                unit = unit.select(1, max(0, n // 2 - 1) + step)
            (grad,) = torch.autograd.grad(unit.abs().sum(), x, retain_graph=True)
            support = (grad[0].abs().sum(0) > 0).cpu().numpy()
            centre = []
            for axis in range(support.ndim):
                idx = np.flatnonzero(support.any(axis=tuple(a for a in range(support.ndim) if a != axis)))
                centre.append((float(idx[0]) + float(idx[-1])) / 2 if idx.size else float("nan"))
            centres.append(centre)
        first = [max(0, n // 2 - 1) for n in size]
        for axis in range(len(size)):
            scale = centres[1][axis] - centres[0][axis]
            if not math.isfinite(scale) or scale <= 0:
                scale = input_shape[1 + axis] / size[axis]
                out.append((scale, (scale - 1) / 2))  # plain interpolation's placement
            else:
                out.append((scale, centres[0][axis] - scale * first[axis]))
        return tuple(out)
    finally:
        handle.remove()


def _device_of(model: nn.Module) -> torch.device:
    """The device a model's parameters are on (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _weights(n_out: int, n_in: int, scale: float, offset: float) -> torch.Tensor:
    """The ``(n_out, n_in)`` linear-interpolation matrix putting unit ``i`` at ``scale * i + offset``,
    holding the edge units' values beyond them."""
    u = ((torch.arange(n_out, dtype=torch.float64) - offset) / scale).clamp(0, n_in - 1)
    lo = u.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = u - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), lo] += 1 - frac
    w[torch.arange(n_out), hi] += frac
    return w.float()


def aligned_upsampler(grid: Sequence[tuple[float, float]]) -> Callable[[Sequence[int]], Callable[[torch.Tensor],
                                                                                                  torch.Tensor]]:
    """An upsampler for MONAI's CAM classes that puts each unit at its receptive field's centre (linear
    interpolation between units, the edge values held beyond the outermost units). Separable: one small
    matrix product per axis, as cheap as plain interpolation."""

    def make(spatial_size: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def up(m: torch.Tensor) -> torch.Tensor:
            out = m
            for axis, (n_out, (scale, offset)) in enumerate(zip(spatial_size, grid, strict=True)):
                w = _weights(int(n_out), int(m.shape[2 + axis]), scale, offset).to(device=m.device, dtype=m.dtype)
                out = torch.movedim(torch.movedim(out, 2 + axis, -1) @ w.T, -1, 2 + axis)
            return out

        return up

    return make


def _scaled(m: np.ndarray) -> np.ndarray:
    m = np.nan_to_num(m.astype(np.float32))
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


@dataclass(frozen=True)
class Saliency:
    """One image's map, the model's probability (its sigmoid; :attr:`logit` the network's output), and how it was
    made."""

    map: np.ndarray  # spatial, float32 in [0, 1]
    probability: float
    method: Method
    layer: str | None
    seconds: float
    logit: float = math.nan


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
             layer: str | None = None, grid: Sequence[tuple[float, float]] | None = None,
             mask_size: int | None = None, overlap: float = 0.5, n_batch: int = 16) -> Saliency:
    """The saliency map of ``model``'s positive-class logit on one image.

    Args:
        model: A network mapping ``(batch, channels, *spatial)`` to one logit per image.
        image: ``(channels, *spatial)``.
        method: Grad-CAM, Grad-CAM++, HiResCAM or occlusion sensitivity.
        layer: The layer Grad-CAM or HiResCAM reads (default: :func:`method_layer`).
        grid: The layer's units on the input (default: :func:`layer_grid`; pass it when mapping many
            images of one size, it costs two backward passes).
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
    x = image.unsqueeze(0).float().to(_device_of(model))  # on the model's device (a GPU at a site that has one)
    if method == Method.HIRESCAM:
        layer = layer or detail_layer(model, tuple(image.shape))
        grid = grid or layer_grid(model, layer, tuple(image.shape))
        t0 = time.perf_counter()
        units, logit = unit_contributions(model, x, layer)
        up = aligned_upsampler(grid)(tuple(int(v) for v in image.shape[1:]))
        result = up(units.clamp(min=0)[None, None])[0, 0].cpu().numpy()  # what pushed the score up
        probability = 1.0 / (1.0 + math.exp(-logit))
    elif method in (Method.GRADCAM, Method.GRADCAMPP):
        layer = layer or target_layer(model, tuple(image.shape))
        grid = grid or layer_grid(model, layer, tuple(image.shape))
        t0 = time.perf_counter()
        cam_cls = GradCAM if method == Method.GRADCAM else GradCAMpp
        # MONAI's default post-processing maps (min, max) to (1, 0): it flips the map. Keep it raw and scale here.
        # MONAI's CAM registers its hooks on the layer and keeps no handle: take them off again, or every map a
        # long-running review page draws leaves two more hooks on the model.
        module = dict(model.named_modules())[layer]
        before = set(module._forward_hooks), set(module._backward_hooks)
        try:
            cam = cam_cls(nn_module=model, target_layers=layer, postprocessing=lambda m: m,
                          upsampler=aligned_upsampler(grid))
            out = cam(x=x, class_idx=0)
        finally:
            for hooks, kept in ((module._forward_hooks, before[0]), (module._backward_hooks, before[1])):
                for key in set(hooks) - kept:
                    del hooks[key]
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
    return Saliency(_scaled(result), probability, method, layer, time.perf_counter() - t0, logit)


def unit_contributions(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, float]:
    """HiResCAM's raw map: for one image ``x`` ``(1, channels, *spatial)``, the activation of ``layer`` times the
    logit's gradient there, element by element, summed over channels (signed, at the layer's grid), and the logit.
    The model runs as the caller left it (:func:`saliency` puts it in eval mode first).

    At the layer a homogeneous pooling reads (the compact CNN's ``features``), the map sums to the logit less what the
    head adds to it without its input (its bias, times the output scale of the network without normalisation).

    Raises:
        SaliencyError: ``layer`` ran more than once on the image, or gave no tensor.
    """
    store: list[object] = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    try:
        with torch.enable_grad():
            logit = model(x).reshape(-1)[0]
            if len(store) != 1 or not isinstance(store[0], torch.Tensor):
                raise SaliencyError(f"layer {layer} of {type(model).__name__} ran {len(store)} times or gave no "
                                    "tensor: choose a layer that runs once")
            act = store[0]
            (grad,) = torch.autograd.grad(logit, act)
    finally:
        handle.remove()
    return (act * grad)[0].sum(0).detach(), float(logit.detach())


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
