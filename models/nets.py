"""``build_model(spec)``: the networks, built the same way on the server and at every site.

All networks come from MONAI, for 2D and 3D through ``spatial_dims``, and are built ready for DP-SGD:

- normalisation is chosen here, so the server and every site have identical ``state_dict`` keys and
  no site ever runs ``ModuleValidator.fix``: InstanceNorm with affine parameters by default (BatchNorm for the
  colorectal CT classifier without DP-SGD, :data:`models.config.TASK_NORM`), GroupNorm or none
  on request, BatchNorm only without DP (all but BatchNorm work per sample, as DP-SGD needs). On the
  synthetic mammography task GroupNorm with two groups of eight channels did not start learning in
  12 epochs where InstanceNorm reached a validation AUROC of 0.9, hence the default;
- activations are not in place: Opacus' per-sample gradient hooks fail on MONAI's default in-place
  ReLU ("Output 0 of BackwardHookFunction is a view and is being modified inplace").

Classifiers output one logit per image (binary: lesion or not); the segmentation network (MONAI's ``UNet``,
for every ``*-seg`` task) outputs one logit per voxel (lesion or background), at the input's size.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet, DenseNet121, UNet
from torch import nn

from models.config import Arch, FineTune, ModelSpec, Norm, resolve_norm

__all__ = ["LESION_PRIOR", "NO_NORM_LOGIT_SCALE", "CompactCNN", "GeMPool", "build_model", "norm_layer",
           "parameter_count", "segmentation_net", "set_trainable"]

ACT = ("relu", {"inplace": False})
LESION_PRIOR = 0.01  # the segmentation network's starting voxel probability of lesion
NO_NORM_LOGIT_SCALE = 16.0
"""The compact CNN without normalisation outputs its head's value times this. Its ReLU features start small
(torch's default initialisation; the pooled features of a colorectal CT near 0.02, against 1.3 with InstanceNorm),
and without the scale the trained colorectal network's logits spanned 0.05 after 30 federated rounds: every score
at 0.50-0.51, all in one bin of the consortium's score histograms, so no operating point could be chosen. He
initialisation instead widened them but the network no longer learned (AUROC 0.61 and 0.54 on two draws where the
default initialisation reached 0.95 and 0.82; BENCHMARKS.md, "Colorectal without normalisation")."""


def _groups(channels: int) -> int:
    """Groups for GroupNorm: 8 channels a group where possible."""
    for groups in (channels // 8, 4, 2, 1):
        if groups >= 1 and channels % groups == 0:
            return groups
    return 1


def norm_layer(norm: Norm, channels: int) -> tuple[str, dict[str, object]] | None:
    """MONAI's norm argument for ``channels`` channels (None: no normalisation)."""
    if norm == Norm.NONE:
        return None
    if norm == Norm.GROUP:
        return ("group", {"num_groups": _groups(channels)})
    if norm == Norm.INSTANCE:
        return ("instance", {"affine": True})
    if norm == Norm.BATCH:
        return ("batch", {})
    raise ValueError(f"norm {norm.value!r} is not a layer: resolve it first (models.config.resolve_norm)")


class GeMPool(nn.Module):
    """Generalised-mean global pooling, ``mean(x**p) ** (1/p)`` over space (inputs are ReLU outputs).

    Between average pooling (p=1) and max pooling (p→∞): the image scores high when some place is
    suspicious, yet every place gets a gradient. Plain max pooling trained far slower here (one
    voxel per channel receives the gradient); average pooling let the network memorise patients.

    Args:
        p: The exponent.
    """

    def __init__(self, p: float = 4.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(batch, channels, *spatial)`` to ``(batch, channels)``."""
        return x.clamp(min=1e-6).pow(self.p).flatten(2).mean(dim=2).pow(1.0 / self.p)


class CompactCNN(nn.Module):
    """A lesion detector read out as a classifier: MONAI ``Convolution`` blocks (conv, norm, ReLU) with
    a receptive field of a few centimetres, then generalised-mean pooling and a linear head.

    The limited receptive field and the near-max pooling are deliberate: with a few hundred studies a
    network that sees the whole body learns to recognise patients instead of lesions (measured on the
    synthetic lung task, 131 training volumes: a four-stage network with average pooling memorised
    the training set and stayed at a validation AUROC of 0.55; with max pooling it barely trained;
    this design climbed to 0.8 in 15 epochs). It also keeps the map that Grad-CAM reads spatially
    meaningful.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Input channels.
        width: Channels of the first block (doubled at each downsampling).
        norm: Normalisation layer.
        dropout: Dropout before the head.
    """

    def __init__(self, spatial_dims: int, in_channels: int, width: int, norm: Norm, dropout: float) -> None:
        super().__init__()
        plan = [(width // 2, 1), (width, 2), (2 * width, 2)]
        layers: list[nn.Module] = []
        channels = in_channels
        for out, stride in plan:
            layers.append(Convolution(spatial_dims, channels, out, strides=stride, kernel_size=3, act=ACT,
                                      norm=norm_layer(norm, out)))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = GeMPool()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, 1)
        self.logit_scale = NO_NORM_LOGIT_SCALE if norm == Norm.NONE else 1.0
        if norm == Norm.NONE:
            nn.init.zeros_(self.head.bias)  # scaled, torch's default bias would start the scores far from 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, ``(batch, 1)``, of images ``(batch, in_channels, *spatial)``."""
        return self.head(self.dropout(self.pool(self.features(x)))) * self.logit_scale


def build_model(spec: ModelSpec) -> nn.Module:
    """The network of ``spec``, with fresh weights from torch's current seed. Its ``norm`` is the one
    :func:`models.config.from_flat` resolved; a spec built in code with ``auto`` gets the network of a run without
    DP-SGD (BatchNorm for the colorectal CT classifier): a run that cannot train BatchNorm (DP-SGD, secure
    aggregation, an adaptive or stepped server) resolves it first (``resolve_norm(spec, batch_ok=False)``).

    Returns:
        A module mapping ``(batch, in_channels, *spatial)`` to ``(batch, 1)`` logits (a classifier) or to
        ``(batch, 1, *spatial)`` logits (the segmentation UNet).
    """
    if spec.network == Arch.COMPACT_CNN:
        norm = resolve_norm(spec, batch_ok=True)
        return CompactCNN(spec.spatial_dims, spec.in_channels, spec.width, norm, spec.dropout)
    if spec.network == Arch.UNET:
        return segmentation_net(spec)
    # MONAI's DenseNet applies one norm argument to layers of many widths: GroupNorm needs a group
    # count dividing all of them (every DenseNet width here is a multiple of 8 or 16).
    kind = resolve_norm(spec, batch_ok=True)
    norm = ("group", {"num_groups": 8}) if kind == Norm.GROUP else norm_layer(kind, 0)
    if norm is None:
        raise ValueError("DenseNets need a norm layer; use norm=instance or norm=group")
    if spec.network == Arch.DENSENET121:
        return DenseNet121(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=1,
                           act=ACT, norm=norm, dropout_prob=spec.dropout)
    return DenseNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=1,
                    init_features=32, growth_rate=16, block_config=(4, 8, 8), act=ACT, norm=norm,
                    dropout_prob=spec.dropout)


def segmentation_net(spec: ModelSpec) -> nn.Module:
    """MONAI's ``UNet`` for lesion segmentation: four levels of ``width/2 .. 4*width`` channels (8 to 64 by
    default), stride 2 in every axis (patches must be multiples of 8), one residual unit per level, the spec's
    DP-compatible norm and a non-in-place ReLU (not MONAI's default PReLU, which Opacus has no per-sample rule for).
    Its transposed convolutions train under Opacus' ``hooks`` mode."""
    kind = resolve_norm(spec, batch_ok=True)
    norm = norm_layer(kind, 0)
    if kind == Norm.GROUP:
        norm = ("group", {"num_groups": 1})  # MONAI's top up-layer normalises the one output channel too
    if norm is None:
        raise ValueError("the UNet needs a norm layer; use norm=instance or norm=group")
    w = spec.width
    net = UNet(spatial_dims=spec.spatial_dims, in_channels=spec.in_channels, out_channels=1,
               channels=(w // 2, w, 2 * w, 4 * w), strides=(2, 2, 2), num_res_units=1, act=ACT, norm=norm,
               dropout=spec.dropout)
    # Start from "lesions are rare" (a voxel probability of LESION_PRIOR, as RetinaNet's focal-loss prior): from
    # 0.5 everywhere the network first learned to predict nothing and stayed there (validation Dice 0 after 20
    # epochs on the synthetic lung task); from the prior it reached 0.66 in 30 epochs on 9 training volumes.
    last = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d)
            and m.out_channels == 1][-1]
    if last.bias is not None:
        nn.init.constant_(last.bias, -math.log((1 - LESION_PRIOR) / LESION_PRIOR))
    return net


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def set_trainable(model: nn.Module, scope: FineTune) -> list[str]:
    """Mark which parameters of a classifier train (``requires_grad``) and return their names.

    ``all``: every parameter. ``norm-head``: the normalisation layers' scale and shift, and the head (the network's
    last linear layer); ``head``: the head alone. The convolutions keep the values the model was given, so a
    network started from a model trained elsewhere keeps its features and adapts their scales and its read-out;
    under DP-SGD the noise then falls on a few hundred numbers instead of thousands. Every flag is set, so a model
    used again with another scope holds no stale ones.

    Raises:
        ValueError: ``scope`` is not ``all`` and the network has no linear head (a segmentation UNet).
    """
    if scope == FineTune.ALL:
        keep = {name for name, _ in model.named_parameters()}
    else:
        heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        if not heads:
            raise ValueError(f"fine-tune={scope.value} needs a classifier head (a linear layer); this network has "
                             "none: use all")
        modules = [heads[-1]]
        if scope == FineTune.NORM_HEAD:
            modules += [name for name, module in model.named_modules() if isinstance(module, _NORMS)]
        keep = {f"{m}.{p}" for m in modules for p, _ in model.get_submodule(m).named_parameters(recurse=False)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return [name for name, _ in model.named_parameters() if name in keep]

