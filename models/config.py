"""The typed run configuration, and the one parser of Flower's flat ``run_config`` keys.

Everything the server and every site must agree on for a run lives here: the task and network, the
local training recipe, the differential-privacy request and the federation. A site's own settings
(workspace, privacy ceiling) are *not* run configuration: they come from the site itself.

Usage::

    config = from_flat({"task": "lung-ct", "local-epochs": "2", "dp": "true", "dp-epsilon": "4"})
    config.model.spatial_dims  # 3
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from models.evaluation import parse_rule
from models.tasks import TASK_DIMS, is_segmentation, task_rounds, task_server_step

__all__ = [
    "ADAPTIVE_SERVER_LR",
    "AUTO_PROXIMAL_MU",
    "AUTO_SERVER_MOMENTUM",
    "AVERAGING",
    "DP_BATCH",
    "DP_LEARNING_RATE",
    "DP_TASK_LEARNING_RATE",
    "DP_NOISE_PER_BATCH",
    "FEDPROX_MU",
    "PLAIN_BATCH",
    "PLAIN_LEARNING_RATE",
    "SEGMENTATION_LEARNING_RATE",
    "SEGMENTATION_SERVER_MOMENTUM",
    "TASK_NORM",
    "Accountant",
    "Arch",
    "ConfigError",
    "FederationSpec",
    "FineTune",
    "GradSampleMode",
    "ModelSpec",
    "Norm",
    "PrivacySpec",
    "Resolution",
    "RunConfig",
    "RunKey",
    "ServerSpec",
    "Strategy",
    "TrainSpec",
    "batch_norm_fits",
    "batch_size_of",
    "dp_outlook",
    "from_flat",
    "parse_bool",
    "resolve_batch",
    "resolve_learning_rate",
    "resolve_norm",
    "resolve_proximal_mu",
    "resolve_server_momentum",
    "proximal_mu_of",
    "resolved_grad_sample_mode",
    "server_step",
    "stored_server_step",
    "validate",
]


class ConfigError(ValueError):
    """A run configuration value or combination is wrong; the message names the key and the fix."""


class Arch(StrEnum):
    """Network architectures ``build_model`` knows."""

    AUTO = "auto"  # the profile's default: compact-cnn at the cpu profile, densenet-small at diagnostic
    COMPACT_CNN = "compact-cnn"  # the CPU default: fast, and DP-SGD costs little on it
    DENSENET_SMALL = "densenet-small"
    DENSENET121 = "densenet121"
    UNET = "unet"  # lesion segmentation (every ``*-seg`` task): MONAI's UNet, one logit per voxel


class Resolution(StrEnum):
    """The resolution profile of the task presets (voxel sizes and fields of view; ``imaging.presets``)."""

    CPU = "cpu"  # coarse: for tests, the demo and CPU-only sites (CT at 5.5 mm)
    DIAGNOSTIC = "diagnostic"  # what a radiologist would accept (CT near 1.5 mm in-plane): for GPU sites


class Norm(StrEnum):
    """Normalisation layers. BatchNorm mixes samples in a batch, which per-sample DP cannot allow. ``auto`` (the
    default) lets the task choose (:data:`TASK_NORM`, :func:`resolve_norm`): InstanceNorm but for the colorectal CT
    classifier."""

    AUTO = "auto"
    GROUP = "group"
    INSTANCE = "instance"  # with affine parameters
    BATCH = "batch"
    NONE = "none"


class FineTune(StrEnum):
    """Which parameters a site trains (:func:`models.nets.set_trainable`). ``all`` (the default) trains the whole
    network; the others keep the convolutions as the run's initial model gives them (``initial-model``) and train
    only the normalisation layers' scale and shift and the classifier's head (``norm-head``), or only the head.
    Under DP-SGD from a public start, ``norm-head`` kept what the start knew where the whole network wore it down
    over long runs (BENCHMARKS.md, "DP-SGD from a public start")."""

    ALL = "all"
    NORM_HEAD = "norm-head"
    HEAD = "head"


class Strategy(StrEnum):
    """Server aggregation strategies (the federation issue wires them to Flower's own)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"


class Accountant(StrEnum):
    """Opacus privacy accountants."""

    RDP = "rdp"
    PRV = "prv"


class GradSampleMode(StrEnum):
    """Opacus per-sample gradient modes (see BENCHMARKS.md for the measured choice).

    ``auto`` picks the fastest mode measured correct for the network: ``ew`` for the compact CNN
    (DP step 1.3-1.7x plain), ``hooks`` for DenseNets (``ew`` fails on them).
    """

    AUTO = "auto"
    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    EW = "ew"
    GHOST = "ghost"


@dataclass(frozen=True)
class ModelSpec:
    """The network: identical on the server and at every site.

    Args:
        task: The task key (``lung-ct``, ``breast-mg``, ``colorectal-ct``, ``prostate-mr``).
        arch: The architecture (``auto``: the resolution profile's default, see :attr:`network`).
        resolution: The preprocessing profile (voxel sizes, fields of view): part of what server and sites
            agree on, as the network trained at one profile is meaningless on images of another.
        spatial_dims: 2 or 3, from the task.
        in_channels: Input channels (1: grey images).
        width: Base channel count of ``compact-cnn`` (doubled at each stage).
        norm: The normalisation layer (``auto``: the task's, :func:`resolve_norm`).
        dropout: Dropout before the classifier.
    """

    task: str = "lung-ct"
    arch: Arch = Arch.AUTO
    resolution: Resolution = Resolution.CPU
    spatial_dims: int = 3
    in_channels: int = 1
    width: int = 16
    norm: Norm = Norm.AUTO
    dropout: float = 0.1

    @property
    def network(self) -> Arch:
        """The concrete architecture: ``arch``, or for ``auto`` the profile's default (the compact CNN at the cpu
        profile; MONAI's small DenseNet, with the DP-compatible norm, at the diagnostic one)."""
        if self.arch != Arch.AUTO:
            return self.arch
        if is_segmentation(self.task):
            return Arch.UNET
        return Arch.COMPACT_CNN if self.resolution == Resolution.CPU else Arch.DENSENET_SMALL


@dataclass(frozen=True)
class TrainSpec:
    """The local training recipe of one round (or of a site-local run).

    Args:
        local_epochs: Passes over the site's training split per round.
        batch_size: Batch size (under DP: the expected Poisson batch); 0 (the default) lets
            :func:`batch_size_of` choose.
        learning_rate: Optimiser step size; 0 (the default) lets :func:`resolve_learning_rate` choose by the kind of
            task and whether it trains under DP-SGD.
        weight_decay: L2 weight decay (decoupled for AdamW).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9).
        proximal_mu: FedProx's proximal term weight; a site applies it only in a FedProx run (the default
            strategy). :data:`AUTO_PROXIMAL_MU` (the default) lets the network choose: :data:`FEDPROX_MU` with a
            normalisation layer, 0 (FedAvg) without one (:func:`from_flat`).
        seed: Seed for weights, sampling and augmentation.
        augment: Apply the preset's training augmentations.
        augmentation_multiplicity: Each sample of a step is drawn this many times, each with its own random
            augmentation, and its gradient is the mean over the copies: under DP-SGD that mean is what is clipped
            and noised, so the copies lower the gradient's variance at no privacy cost (De et al., 2022). It costs
            this many times the compute per step. 1: off.
        threads: Torch CPU threads (0: leave torch's default).
        fine_tune: Which parameters train (:class:`FineTune`); anything but ``all`` needs the run's initial model.
    """

    local_epochs: int = 1
    batch_size: int = 0
    learning_rate: float = 0.0
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    proximal_mu: float = -1.0
    seed: int = 0
    augment: bool = True
    augmentation_multiplicity: int = 1
    threads: int = 0
    fine_tune: FineTune = FineTune.ALL


# The batch a run trains with when it sets none (batch-size 0). Without DP: 4 samples per step. The synthetic
# consortium's sites hold 30-100 training studies, so a batch of 16 gives 2-7 optimizer steps per epoch; with 4,
# colorectal CT pooled reaches validation AUROC 0.97 in 15 epochs where 16 was at 0.88 after 26 (and at 0.56 with
# one CPU thread instead of two: that slow a learner was at the mercy of rounding), and federated rounds of one
# local epoch take four times the steps. Under DP-SGD an expected 16: the noise on the averaged gradient falls
# with the batch, and a batch of 4 drowns it.
PLAIN_BATCH = 4
DP_BATCH = 16
# The most images one step may hold with augmentation multiplicity (batch × copies): under DP-SGD every one keeps a
# per-sample gradient, and at 512 a 3D DenseNet's would take about 23 GB.
MAX_ROWS_PER_STEP = 256


def resolve_batch(batch_size: int, *, dp: bool) -> int:
    """``batch_size``, or for 0 the default of :data:`PLAIN_BATCH` (:data:`DP_BATCH` under DP-SGD)."""
    return batch_size if batch_size > 0 else (DP_BATCH if dp else PLAIN_BATCH)


# The optimiser's step when the run sets none. The classifiers learn at 1e-3 (BENCHMARKS.md, "The default recipe").
# The segmentation UNets at 3e-3: pooled prostate-mr-seg scored Dice 0.647 at 1e-3, 0.744 at 3e-3 and 0.296 at 1e-2
# on 144 held-out studies, and every federated recipe followed (BENCHMARKS.md, "The recipe search for segmentation").
# Under DP-SGD a classifier learns at 3e-3 too: the noise averages out over larger steps. At one site of 96 studies,
# ε = 8, 20 epochs: lung validation AUROC 0.74-0.86 at 1e-3 (two data seeds), 0.917 at 3e-3; breast 0.52-0.55 at
# 1e-3, 0.771 at 3e-3 (30 epochs). Every DP figure that met issue 19's goal was trained at 3e-3 (BENCHMARKS.md).
PLAIN_LEARNING_RATE = 1e-3
SEGMENTATION_LEARNING_RATE = 3e-3
DP_LEARNING_RATE = 3e-3
# Breast MG under DP-SGD learns at 1e-2: since DP-SGD samples patients (0.3.5), at 3 sites × 96 studies, ε = 8 and 30
# rounds, held-out AUROC 0.825 and 0.813 at 1e-2 against 0.723 and 0.649 at 3e-3 (two draws of the noise each;
# BENCHMARKS.md, "DP-SGD per patient"). Lung keeps 3e-3, with which it met the goal per patient too (0.962).
DP_TASK_LEARNING_RATE: MappingProxyType[str, float] = MappingProxyType({"breast-mg": 1e-2})


def resolve_learning_rate(learning_rate: float, *, segmentation: bool, dp: bool, task: str = "") -> float:
    """``learning_rate``, or for 0 the default of the kind of task and training: :data:`SEGMENTATION_LEARNING_RATE`
    for a segmentation task, for a classifier under DP-SGD its task's :data:`DP_TASK_LEARNING_RATE` or else
    :data:`DP_LEARNING_RATE`, :data:`PLAIN_LEARNING_RATE` for a classifier without."""
    if learning_rate > 0:
        return learning_rate
    if segmentation:
        return SEGMENTATION_LEARNING_RATE
    return DP_TASK_LEARNING_RATE.get(task, DP_LEARNING_RATE) if dp else PLAIN_LEARNING_RATE


def batch_size_of(config: RunConfig) -> int:
    """The batch size a run trains with (its ``batch-size``, or the default for plain or DP-SGD training)."""
    return resolve_batch(config.training.batch_size, dp=config.privacy.enabled)


@dataclass(frozen=True)
class PrivacySpec:
    """The DP-SGD request of a run. The site's ceiling is the site's own, never part of this.

    Args:
        enabled: Train with DP-SGD.
        epsilon: The ε this run may spend at a site over all its planned steps.
        delta: δ; 0 means "choose": 1 / (10 × training samples), below 1 / samples.
        max_grad_norm: Per-sample gradient clipping norm C.
        accountant: The Opacus accountant used to calibrate noise and to count ε.
        grad_sample_mode: The Opacus per-sample gradient mode.
    """

    enabled: bool = False
    epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    accountant: Accountant = Accountant.RDP
    grad_sample_mode: GradSampleMode = GradSampleMode.AUTO


@dataclass(frozen=True)
class FederationSpec:
    """The federation around the local training.

    Args:
        num_rounds: Server rounds; 0 runs the task's count (:func:`models.tasks.task_rounds`: under DP-SGD 30 for
            every classifier, more for lung and breast, fewer for prostate and colorectal), resolved when the
            configuration is read, alike at the server and at every site.
        strategy: Aggregation strategy (default FedProx with ``proximal-mu`` 0.01; FedAvg for a network without
            normalisation, see :data:`AUTO_PROXIMAL_MU`).
        fraction_train: Share of connected sites asked to train each round.
        fraction_evaluate: Share asked to evaluate.
        min_sites: Sites needed before a round starts.
        server_learning_rate: The server's step on the round's aggregated update; 0 (the default) is resolved when
            the configuration is read for FedAvg and FedProx: the task's step (:func:`models.tasks.task_server_step`:
            2 for breast MG without DP-SGD, else 1, the aggregate itself; 1 with BatchNorm or server momentum);
            :func:`server_step` takes 1 for FedMedian and FedTrimmedAvg and :data:`ADAPTIVE_SERVER_LR` for FedAdam /
            FedYogi (Flower's ``eta``).
        server_momentum: Momentum β of the server's step for the averaging strategies (FedAvgM, Hsu et al. 2019, as
            Flower's ``FedAvgM`` computes it): the step goes along ``v = β v + (aggregate − global)`` instead of the
            round's update alone; 0 is plain FedAvg / FedProx. −1 (the default) is resolved when the configuration is
            read (:data:`AUTO_SERVER_MOMENTUM`): the segmentation task's (:data:`SEGMENTATION_SERVER_MOMENTUM`) under
            an averaging strategy without DP-SGD or BatchNorm, else 0. Its state is checkpointed with every round, so a
            resumed run steps as an uninterrupted one.
        trim_beta: Share of updates cut at each end per coordinate by the trimmed mean.
        operating_point: How the final model's threshold is chosen on the consortium's pooled validation scores
            (``youden``, ``sensitivity>=0.9``, ``specificity>=0.9`` or ``fixed:0.5``; ``models.evaluation``), then
            reported on the test split.
    """

    num_rounds: int = 0
    strategy: Strategy = Strategy.FEDPROX
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    server_learning_rate: float = 0.0
    server_momentum: float = -1.0
    trim_beta: float = 0.2
    operating_point: str = "youden"


# The strategies whose new global model is an aggregate of the sites' models (a server step may scale it).
AVERAGING = (Strategy.FEDAVG, Strategy.FEDPROX, Strategy.FEDMEDIAN, Strategy.FEDTRIMMEDAVG)

# FedAdam's and FedYogi's step when the run sets none: with Flower's τ of 1e-3 their first steps move each weight by
# about this much, whatever the size of the sites' updates.
ADAPTIVE_SERVER_LR = 0.01


AUTO_SERVER_MOMENTUM = -1.0
"""``server-momentum`` that lets the task choose (the default)."""

# Server momentum of the segmentation tasks by default. In the recipe search (BENCHMARKS.md, "The recipe search for
# segmentation"; 3 sites x 48 studies, 20 rounds, Dice on 144 held-out studies), on two draws of patients (in one
# process, and through Flower), momentum lifted plain FedProx at equal compute: at 0.9 prostate 0.585 -> 0.735 and
# 0.487 -> 0.634, lung 0.714 -> 0.788 and 0.692 -> 0.784, colorectal 0.778 -> 0.810 and 0.771 -> 0.781; breast did
# better at 0.5 in both draws (0.803 and 0.768, against 0.747 and 0.729 at 0.9). Not for the classifiers (prostate
# fell from 0.826 to 0.593 AUROC at 0.9) nor under DP-SGD (momentum adds up successive rounds' noise: breast
# 0.848 -> 0.775 at epsilon 8).
SEGMENTATION_SERVER_MOMENTUM: MappingProxyType[str, float] = MappingProxyType(
    {"lung-ct-seg": 0.9, "prostate-mr-seg": 0.9, "colorectal-ct-seg": 0.9, "breast-mg-seg": 0.5})


# The normalisation of a task's compact CNN under ``norm=auto`` (the default); every other task and network:
# InstanceNorm. Colorectal CT: BatchNorm (InstanceNorm where the run cannot train it: under DP-SGD or secure
# aggregation, or with an adaptive server step or server momentum; batch_norm_fits). A CT number is an
# absolute scale, and the colorectal cue is one: an enhancing mass at 90-130 HU against bowel wall and muscle at
# 40-60 HU. InstanceNorm rescales the first layer's output by each volume's own mean and spread (set by body size and
# the air around it), so that level moves from patient to patient; BatchNorm normalises by the statistics of the
# batch in training and of the whole population (its running statistics, averaged over the sites) in use, so the
# level stays where it is. On three draws of the synthetic consortium (3 sites x 48 studies, 30 rounds of FedProx
# μ 0.01, AUROC on 144 held-out studies) it reached 0.963 / 0.883 / 0.909 where InstanceNorm reached 0.798 / 0.657 /
# 0.670, 0.922 where InstanceNorm reached 0.787 on the non-IID variant, and 0.868 on the learning test's consortium;
# its logits spread over 1.0-1.9 (four to eight of the score histograms' bins). Without normalisation (the earlier
# ``norm=auto``, now ``norm=none``) the network ranked as well on three draws but sat at chance on the fourth, and its
# scores spread less than one bin, since a network without normalisation grows its output with the count of steps
# (BENCHMARKS.md, "Colorectal with BatchNorm"). MR and mammography have no absolute scale.
TASK_NORM: MappingProxyType[str, Norm] = MappingProxyType({"colorectal-ct": Norm.BATCH})

FEDPROX_MU = 0.01
"""FedProx's μ for a network with normalisation layers: the best federated recipe of the synthetic consortium's
classifiers with InstanceNorm (BENCHMARKS.md, "Through Flower")."""

AUTO_PROXIMAL_MU = -1.0
"""``proximal-mu`` that lets the network choose (the default): :data:`FEDPROX_MU` with a normalisation layer; 0
without one, and a FedProx run then runs as FedAvg. Without normalisation the proximal term held the colorectal
network at chance (AUROC 0.49 and 0.56 on 144 held-out studies where FedAvg reached 0.99 and 0.78, the same two
draws). A likely reason: AdamW scales each weight's step by its own gradients, so the pull back to the global
model can outweigh the weak early gradients of a network that no norm layer rescales."""


def resolve_norm(spec: ModelSpec, *, batch_ok: bool) -> Norm:
    """The network's normalisation: ``spec.norm``, or for ``auto`` the task's (:data:`TASK_NORM`, for the compact
    CNN only) and InstanceNorm otherwise (DenseNets and the UNet need a norm layer). Where the task's is BatchNorm
    and the run cannot train it (``batch_ok`` false, :func:`batch_norm_fits`), InstanceNorm."""
    if spec.norm != Norm.AUTO:
        return spec.norm
    norm = TASK_NORM.get(spec.task, Norm.INSTANCE) if spec.network == Arch.COMPACT_CNN else Norm.INSTANCE
    return Norm.INSTANCE if norm == Norm.BATCH and not batch_ok else norm


def batch_norm_fits(federation: FederationSpec, *, dp: bool, secure: bool) -> bool:
    """Whether a run can train BatchNorm: not under DP-SGD (it mixes the samples of a batch), not under secure
    aggregation (SecAgg+ clips every value to ``clipping-range``, the running statistics too), and with an averaging
    strategy at server step 1 without server momentum (a server step would move its running statistics too, and a
    running variance stepped past the sites' values can turn negative). :func:`validate` refuses it otherwise."""
    return (not dp and not secure and federation.strategy in AVERAGING and server_step(federation) == 1.0
            and federation.server_momentum in (0.0, AUTO_SERVER_MOMENTUM))


def resolve_proximal_mu(mu: float, norm: Norm) -> float:
    """FedProx's μ: ``mu``, or for :data:`AUTO_PROXIMAL_MU` :data:`FEDPROX_MU` with a normalisation layer (``norm``,
    resolved) and 0 without one."""
    if mu != AUTO_PROXIMAL_MU:
        return mu
    return 0.0 if norm == Norm.NONE else FEDPROX_MU


def resolve_server_momentum(federation: FederationSpec, *, task: str, dp: bool, norm: Norm) -> float:
    """The run's server momentum: its ``server-momentum``, or for :data:`AUTO_SERVER_MOMENTUM` the segmentation
    task's (:data:`SEGMENTATION_SERVER_MOMENTUM`) under an averaging strategy without DP-SGD or BatchNorm, and 0
    otherwise."""
    if federation.server_momentum != AUTO_SERVER_MOMENTUM:
        return federation.server_momentum
    auto = task in SEGMENTATION_SERVER_MOMENTUM and federation.strategy in AVERAGING and not dp and norm != Norm.BATCH
    return SEGMENTATION_SERVER_MOMENTUM[task] if auto else 0.0


def server_step(federation: FederationSpec) -> float:
    """The server's step on a round's aggregated update: the run's ``server-learning-rate`` (for FedAvg and FedProx
    resolved by :func:`from_flat` to the task's, :func:`models.tasks.task_server_step`), or by default
    :data:`ADAPTIVE_SERVER_LR` for FedAdam / FedYogi and 1 (the aggregate itself) for the averaging strategies
    (FedMedian, FedTrimmedAvg, and FedAvg or FedProx in a configuration built in code).

    A step above 1 moves the global model further along the sites' mean update: at the number of sites, a round of
    one local epoch moves it about as far as an epoch over everyone's data. It is breast MG's default (2) and no
    other task's, because elsewhere it did not hold up: on the synthetic consortium it lifted colorectal CT at 10
    rounds (AUROC 0.57 → 0.87 on 144 held-out studies, seed 0) but not at seed 1 (0.60 → 0.57), made lung unstable
    (0.997 → 0.86), and held prostate MR at 30 rounds to 0.64-0.70 where the plain mean reached 0.86-0.91
    (BENCHMARKS.md, "The recipe search"). The step needs no state between rounds, so a resumed run steps as an
    uninterrupted one, and it works under secure aggregation, where the server sees only the sum.

    Args:
        federation: The run's federation settings.
    """
    if federation.server_learning_rate > 0:
        return federation.server_learning_rate
    return 1.0 if federation.strategy in AVERAGING else ADAPTIVE_SERVER_LR


def stored_server_step(stored: Mapping[str, Any]) -> float:
    """The ``server-learning-rate`` a stored (flat) run config ran with: its value, or for one stored unresolved (0 or
    absent: written before 0.3.5, when the step was not stored resolved) 1, the mean itself, under an averaging
    strategy, and 0 (:data:`ADAPTIVE_SERVER_LR`) under FedAdam / FedYogi. A resume and the report read it, so a run
    from before breast's step of 2 keeps the step it ran."""
    value = float(stored.get(RunKey.SERVER_LEARNING_RATE, 0) or 0)
    if value > 0:
        return value
    adaptive = str(stored.get(RunKey.STRATEGY, Strategy.FEDPROX.value)).strip().lower() in (
        Strategy.FEDADAM.value, Strategy.FEDYOGI.value)
    return 0.0 if adaptive else 1.0


def proximal_mu_of(config: RunConfig) -> float:
    """FedProx's μ where the run is a FedProx run, else 0 (the run config's ``proximal-mu`` has a default in every
    run; only FedProx uses it)."""
    if config.federation.strategy != Strategy.FEDPROX:
        return 0.0
    # A config built in code (not read by from_flat) may still hold the -1 of "the network's default".
    batch_ok = batch_norm_fits(config.federation, dp=config.privacy.enabled, secure=config.server.secure_aggregation)
    return resolve_proximal_mu(config.training.proximal_mu, resolve_norm(config.model, batch_ok=batch_ok))


@dataclass(frozen=True)
class ServerSpec:
    """How the server runs the federation (the sites read none of it, except ``sim_sites`` in a simulation).

    Args:
        run_dir: The run directory (empty: ``~/oncofed-runs/run-<id>``).
        resume: A run directory to continue from its last checkpoint (empty: a new run).
        initial_model: A ``model.pt`` a new run starts from instead of fresh weights (a model trained on a public
            archive, or an earlier run's global model; ``fl_server.initial``). A resumed run starts from its checkpoint.
        sim_sites: In a simulation, the folder whose sub-folders are the site workspaces.
        final_evaluation: Evaluate the final model on every site's test split.
        update_norm_factor: Drop an update whose norm exceeds this many times the others' median.
        round_timeout: Seconds to wait for the sites' replies in a round.
        secure_aggregation: Run Flower's SecAgg+ protocol (the server sees only the sum of the updates).
        evaluate_in_train: Sites evaluate the model they receive inside the next training message.
        reconstruction_threshold: SecAgg+ shares needed to reconstruct (0: min-sites - 1).
        clipping_range: SecAgg+ clips each value to plus or minus this before masking.
        data_summary: Ask every site for its data summary before round 1 (kept in ``RUN_DIR/summary/``).
        summary_only: Ask for the data summary and stop: no training (``oncofed-server summary``).
        cross_site_eval: After the last round, every site evaluates the global model and every site's last local
            model on its test split (the cross-site matrix of the report).
    """

    run_dir: str = ""
    resume: str = ""
    initial_model: str = ""
    sim_sites: str = ""
    final_evaluation: bool = True
    update_norm_factor: float = 10.0
    round_timeout: float = 3600.0
    secure_aggregation: bool = False
    evaluate_in_train: bool = True
    reconstruction_threshold: int = 0
    clipping_range: float = 8.0
    data_summary: bool = True
    summary_only: bool = False
    cross_site_eval: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything the server and the sites agree on for one run."""

    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainSpec = field(default_factory=TrainSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    server: ServerSpec = field(default_factory=ServerSpec)

    def to_flat(self) -> dict[str, Any]:
        """The flat keys that :func:`from_flat` reads back to an equal config."""
        out: dict[str, Any] = {}
        for key, (section, attr, _) in KEYS.items():
            value = getattr(getattr(self, section), attr)
            out[str(key)] = value.value if isinstance(value, StrEnum) else value
        return out


def parse_bool(text: Any) -> bool:
    """The one true/false parser of oncofed: true/1/yes/on and false/0/no/off (any case); anything else raises.

    Raises:
        ValueError: Neither.
    """
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _enum(kind: type[StrEnum]) -> Callable[[Any], StrEnum]:
    def parse(text: Any) -> StrEnum:
        try:
            return kind(str(text).strip().lower())
        except ValueError:
            raise ValueError(f"expected one of {', '.join(m.value for m in kind)}") from None

    return parse


def _int(text: Any) -> int:
    if isinstance(text, bool):
        raise ValueError("expected an integer")
    if isinstance(text, float) and not text.is_integer():
        raise ValueError("expected an integer")
    return int(float(text)) if isinstance(text, float) else int(str(text).strip())


def _float(text: Any) -> float:
    if isinstance(text, bool):
        raise ValueError("expected a number")
    value = float(str(text).strip()) if not isinstance(text, int | float) else float(text)
    if not math.isfinite(value):  # NaN passes no range check by itself: no key takes it
        raise ValueError("expected a finite number")
    return value


def _str(text: Any) -> str:
    return str(text).strip()


class RunKey(StrEnum):
    """The run-config keys (Flower's flat ``run_config``): the only place they are spelled."""

    TASK = "task"
    MODEL = "model"
    RESOLUTION = "resolution"
    MODEL_WIDTH = "model-width"
    NORM = "norm"
    DROPOUT = "dropout"
    LOCAL_EPOCHS = "local-epochs"
    BATCH_SIZE = "batch-size"
    LEARNING_RATE = "learning-rate"
    WEIGHT_DECAY = "weight-decay"
    OPTIMIZER = "optimizer"
    PROXIMAL_MU = "proximal-mu"
    SEED = "seed"
    AUGMENT = "augment"
    AUGMENTATION_MULTIPLICITY = "augmentation-multiplicity"
    THREADS = "threads"
    FINE_TUNE = "fine-tune"
    DP = "dp"
    DP_EPSILON = "dp-epsilon"
    DP_DELTA = "dp-delta"
    DP_MAX_GRAD_NORM = "dp-max-grad-norm"
    DP_ACCOUNTANT = "dp-accountant"
    DP_GRAD_SAMPLE_MODE = "dp-grad-sample-mode"
    NUM_ROUNDS = "num-rounds"
    STRATEGY = "strategy"
    FRACTION_TRAIN = "fraction-train"
    FRACTION_EVALUATE = "fraction-evaluate"
    MIN_SITES = "min-sites"
    SERVER_LEARNING_RATE = "server-learning-rate"
    SERVER_MOMENTUM = "server-momentum"
    TRIM_BETA = "trim-beta"
    OPERATING_POINT = "operating-point"
    RUN_DIR = "run-dir"
    RESUME = "resume"
    INITIAL_MODEL = "initial-model"
    SIM_SITES = "sim-sites"
    FINAL_EVALUATION = "final-evaluation"
    UPDATE_NORM_FACTOR = "update-norm-factor"
    ROUND_TIMEOUT = "round-timeout"
    SECURE_AGGREGATION = "secure-aggregation"
    EVALUATE_IN_TRAIN = "evaluate-in-train"
    RECONSTRUCTION_THRESHOLD = "reconstruction-threshold"
    DATA_SUMMARY = "data-summary"
    CROSS_SITE_EVAL = "cross-site-eval"
    SUMMARY_ONLY = "summary-only"
    CLIPPING_RANGE = "clipping-range"


# flat key -> (section, attribute, parser)
KEYS: dict[RunKey, tuple[str, str, Callable[[Any], Any]]] = {
    RunKey.TASK: ("model", "task", _str),
    RunKey.MODEL: ("model", "arch", _enum(Arch)),
    RunKey.RESOLUTION: ("model", "resolution", _enum(Resolution)),
    RunKey.MODEL_WIDTH: ("model", "width", _int),
    RunKey.NORM: ("model", "norm", _enum(Norm)),
    RunKey.DROPOUT: ("model", "dropout", _float),
    RunKey.LOCAL_EPOCHS: ("training", "local_epochs", _int),
    RunKey.BATCH_SIZE: ("training", "batch_size", _int),
    RunKey.LEARNING_RATE: ("training", "learning_rate", _float),
    RunKey.WEIGHT_DECAY: ("training", "weight_decay", _float),
    RunKey.OPTIMIZER: ("training", "optimizer", _str),
    RunKey.PROXIMAL_MU: ("training", "proximal_mu", _float),
    RunKey.SEED: ("training", "seed", _int),
    RunKey.AUGMENT: ("training", "augment", parse_bool),
    RunKey.AUGMENTATION_MULTIPLICITY: ("training", "augmentation_multiplicity", _int),
    RunKey.THREADS: ("training", "threads", _int),
    RunKey.FINE_TUNE: ("training", "fine_tune", _enum(FineTune)),
    RunKey.DP: ("privacy", "enabled", parse_bool),
    RunKey.DP_EPSILON: ("privacy", "epsilon", _float),
    RunKey.DP_DELTA: ("privacy", "delta", _float),
    RunKey.DP_MAX_GRAD_NORM: ("privacy", "max_grad_norm", _float),
    RunKey.DP_ACCOUNTANT: ("privacy", "accountant", _enum(Accountant)),
    RunKey.DP_GRAD_SAMPLE_MODE: ("privacy", "grad_sample_mode", _enum(GradSampleMode)),
    RunKey.NUM_ROUNDS: ("federation", "num_rounds", _int),
    RunKey.STRATEGY: ("federation", "strategy", _enum(Strategy)),
    RunKey.FRACTION_TRAIN: ("federation", "fraction_train", _float),
    RunKey.FRACTION_EVALUATE: ("federation", "fraction_evaluate", _float),
    RunKey.MIN_SITES: ("federation", "min_sites", _int),
    RunKey.SERVER_LEARNING_RATE: ("federation", "server_learning_rate", _float),
    RunKey.SERVER_MOMENTUM: ("federation", "server_momentum", _float),
    RunKey.TRIM_BETA: ("federation", "trim_beta", _float),
    RunKey.OPERATING_POINT: ("federation", "operating_point", _str),
    RunKey.RUN_DIR: ("server", "run_dir", _str),
    RunKey.RESUME: ("server", "resume", _str),
    RunKey.INITIAL_MODEL: ("server", "initial_model", _str),
    RunKey.SIM_SITES: ("server", "sim_sites", _str),
    RunKey.FINAL_EVALUATION: ("server", "final_evaluation", parse_bool),
    RunKey.UPDATE_NORM_FACTOR: ("server", "update_norm_factor", _float),
    RunKey.ROUND_TIMEOUT: ("server", "round_timeout", _float),
    RunKey.SECURE_AGGREGATION: ("server", "secure_aggregation", parse_bool),
    RunKey.EVALUATE_IN_TRAIN: ("server", "evaluate_in_train", parse_bool),
    RunKey.RECONSTRUCTION_THRESHOLD: ("server", "reconstruction_threshold", _int),
    RunKey.CLIPPING_RANGE: ("server", "clipping_range", _float),
    RunKey.DATA_SUMMARY: ("server", "data_summary", parse_bool),
    RunKey.SUMMARY_ONLY: ("server", "summary_only", parse_bool),
    RunKey.CROSS_SITE_EVAL: ("server", "cross_site_eval", parse_bool),
}


def from_flat(flat: Mapping[str, Any], *, base: RunConfig | None = None) -> RunConfig:
    """Parse Flower's flat ``run_config`` (or CLI options) into a checked :class:`RunConfig`.

    Args:
        flat: Key/value pairs; values may be strings (from ``--run-config``) or typed values.
        base: Defaults to start from (default: :class:`RunConfig`'s).

    Raises:
        ConfigError: An unknown key (with the closest known one), a value of the wrong kind, out of
            range, or a bad combination; the message says what to change.
    """
    config = base or RunConfig()
    sections: dict[str, dict[str, Any]] = {f.name: {} for f in fields(RunConfig)}
    for key, raw in flat.items():
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), [str(k) for k in KEYS], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(map(str, KEYS))}"
            raise ConfigError(f"unknown run-config key {key!r}{hint}")
        section, attr, parse = KEYS[key]
        try:
            sections[section][attr] = parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"run-config key {str(key)!r}: {raw!r} is not valid ({exc})") from None
    model = replace(config.model, **sections["model"])
    if model.task not in TASK_DIMS:
        raise ConfigError(f"run-config key 'task': unknown task {model.task!r}; known: {', '.join(TASK_DIMS)}")
    model = replace(model, spatial_dims=TASK_DIMS[model.task])
    privacy = replace(config.privacy, **sections["privacy"])
    federation = replace(config.federation, **sections["federation"])
    server = replace(config.server, **sections["server"])
    batch_ok = batch_norm_fits(federation, dp=privacy.enabled, secure=server.secure_aggregation)
    model = replace(model, norm=resolve_norm(model, batch_ok=batch_ok))
    training = replace(config.training, **sections["training"])
    if training.proximal_mu == AUTO_PROXIMAL_MU:
        training = replace(training, proximal_mu=resolve_proximal_mu(AUTO_PROXIMAL_MU, model.norm))
        if training.proximal_mu == 0.0 and federation.strategy == Strategy.FEDPROX:
            federation = replace(federation, strategy=Strategy.FEDAVG)
    if federation.num_rounds == 0:
        federation = replace(federation, num_rounds=task_rounds(model.task, dp=privacy.enabled))
    federation = replace(federation, server_momentum=resolve_server_momentum(
        federation, task=model.task, dp=privacy.enabled, norm=model.norm))
    # The task's step was measured on the plain mean: not with BatchNorm, nor on top of server momentum.
    if (federation.server_learning_rate == 0.0 and federation.strategy in (Strategy.FEDAVG, Strategy.FEDPROX)
            and model.norm != Norm.BATCH and federation.server_momentum == 0.0):
        federation = replace(federation, server_learning_rate=task_server_step(model.task, dp=privacy.enabled))
    result = RunConfig(
        model=model,
        training=training,
        privacy=privacy,
        federation=federation,
        server=server,
    )
    validate(result)
    secure = result.server.secure_aggregation
    if secure and result.federation.strategy not in (Strategy.FEDAVG, Strategy.FEDPROX):
        raise ConfigError(f"run-config key 'secure-aggregation': works with strategy fedavg or fedprox, not "
                          f"{result.federation.strategy.value} (the protocol reveals only a weighted sum)")
    if secure and result.federation.min_sites < 3:
        raise ConfigError("run-config key 'secure-aggregation' needs min-sites of 3 or more (with two sites each "
                          "could work out the other's update from the sum): set min-sites=3")
    return result


DP_NOISE_PER_BATCH = 0.2
"""DP-SGD adds noise of ``noise_multiplier × clipping norm`` to the sum of a batch's clipped gradients; divided by
the expected batch, it is the noise on each averaged gradient. On the synthetic tasks 70 training studies at ε = 8
learned (0.07); 25 studies at noise 4.8-7.7 did not (about 0.4): above this share of the clipping norm the data
summary warns the lead, and a site warns before it trains."""


def dp_outlook(noise_multiplier: float, expected_batch: float) -> str | None:
    """A sentence saying why DP-SGD is unlikely to learn at this noise and batch, or None when it may.

    Args:
        noise_multiplier: The calibrated noise multiplier.
        expected_batch: The expected (Poisson) batch size: sample rate × training samples.
    """
    share = noise_multiplier / max(expected_batch, 1e-9)
    if share <= DP_NOISE_PER_BATCH:
        return None
    return (f"DP-SGD noise multiplier {noise_multiplier:.2f} on batches of about {expected_batch:.0f}: the noise on "
            f"each averaged gradient is {share:.2f} of the clipping norm (above {DP_NOISE_PER_BATCH:g}), so learning "
            "is unlikely; more patients per site, a larger batch, fewer rounds or epochs, or a larger ε help")


def resolved_grad_sample_mode(config: RunConfig) -> GradSampleMode:
    """The Opacus mode to use: ``auto`` becomes ``ew`` for the compact CNN and ``hooks`` otherwise."""
    mode = config.privacy.grad_sample_mode
    if mode != GradSampleMode.AUTO:
        return mode
    return GradSampleMode.EW if config.model.network == Arch.COMPACT_CNN else GradSampleMode.HOOKS


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"run-config key {str(key)!r}: {message}")


def validate(config: RunConfig) -> None:
    """Reject values out of range and combinations that cannot work, naming the key and the fix.

    Raises:
        ConfigError: The first problem found.
    """
    m, t, p, f = config.model, config.training, config.privacy, config.federation
    _check(m.spatial_dims == TASK_DIMS.get(m.task, m.spatial_dims), RunKey.TASK,
           f"task {m.task!r} is {TASK_DIMS.get(m.task)}D, the model spec says {m.spatial_dims}D")
    _check(m.in_channels >= 1, "in-channels", "must be at least 1")
    _check(4 <= m.width <= 256 and m.width % 4 == 0, RunKey.MODEL_WIDTH, "must be a multiple of 4 from 4 to 256")
    _check(0.0 <= m.dropout < 1.0, RunKey.DROPOUT, "must be in [0, 1)")
    _check(m.norm != Norm.NONE or m.network == Arch.COMPACT_CNN, RunKey.NORM,
           "DenseNets and the UNet need a norm layer; use instance or group")
    _check((m.network == Arch.UNET) == is_segmentation(m.task), RunKey.MODEL,
           f"task {m.task} needs " + ("model=unet (or auto): it segments lesions" if is_segmentation(m.task) else
                                      "a classifier (auto, compact-cnn, densenet-small, densenet121), not the unet"))
    _check(t.local_epochs >= 1, RunKey.LOCAL_EPOCHS, "must be at least 1")
    _check(0 <= t.batch_size <= 4096, RunKey.BATCH_SIZE, "must be between 1 and 4096, or 0 (auto)")
    _check(0.0 <= t.learning_rate <= 10.0, RunKey.LEARNING_RATE, "must be in (0, 10], or 0 for the task's default")
    _check(t.weight_decay >= 0.0, RunKey.WEIGHT_DECAY, "must be 0 or more")
    _check(t.optimizer in ("adamw", "sgd"), RunKey.OPTIMIZER, "must be adamw or sgd")
    _check(t.proximal_mu >= 0.0 or t.proximal_mu == AUTO_PROXIMAL_MU, RunKey.PROXIMAL_MU,
           "must be 0 (off) or more, or -1 for the network's default")
    _check(t.threads >= 0, RunKey.THREADS, "must be 0 (torch default) or more")
    k = t.augmentation_multiplicity
    _check(1 <= k <= 32, RunKey.AUGMENTATION_MULTIPLICITY,
           "must be from 1 (off) to 32 (each copy costs a forward and backward pass)")
    _check(k == 1 or t.augment, RunKey.AUGMENTATION_MULTIPLICITY,
           "copies differ only by their random augmentation: with augment=false they would be the same image "
           "k times (k times the compute, no gain); set augment=true or augmentation-multiplicity=1")
    _check(k == 1 or p.grad_sample_mode != GradSampleMode.GHOST, RunKey.AUGMENTATION_MULTIPLICITY,
           "needs per-sample gradients: dp-grad-sample-mode ghost keeps none; use auto, ew, hooks or functorch")
    rows = k * max(resolve_batch(t.batch_size, dp=False), resolve_batch(t.batch_size, dp=True))
    _check(rows <= MAX_ROWS_PER_STEP, RunKey.AUGMENTATION_MULTIPLICITY,
           f"batch-size × augmentation-multiplicity is {rows} images a step (under DP-SGD each with its own "
           f"gradient in memory); at most {MAX_ROWS_PER_STEP}: lower one of them")
    _check(t.fine_tune == FineTune.ALL or not is_segmentation(m.task), RunKey.FINE_TUNE,
           f"task {m.task} segments: its UNet has no classifier head to fine-tune; use all")
    _check(t.fine_tune == FineTune.ALL or bool(config.server.initial_model), RunKey.FINE_TUNE,
           f"{t.fine_tune.value} keeps the convolutions as the initial model gives them, and this run starts from "
           "fresh weights: set initial-model (--initial-model MODEL) on a new run, or fine-tune=all")
    _check(f.num_rounds >= 1, RunKey.NUM_ROUNDS, "must be at least 1, or 0 for the task's count")
    _check(0.0 < f.fraction_train <= 1.0, RunKey.FRACTION_TRAIN, "must be in (0, 1]")
    _check(0.0 <= f.fraction_evaluate <= 1.0, RunKey.FRACTION_EVALUATE, "must be in [0, 1]")
    _check(f.min_sites >= 1, RunKey.MIN_SITES, "must be at least 1")
    if f.strategy in (Strategy.FEDADAM, Strategy.FEDYOGI):
        _check(0.0 <= f.server_learning_rate <= 1.0, RunKey.SERVER_LEARNING_RATE,
               f"must be in (0, 1] for {f.strategy.value}, or 0 for {ADAPTIVE_SERVER_LR}")
    else:
        _check(0.0 <= f.server_learning_rate <= 100.0, RunKey.SERVER_LEARNING_RATE,
               "must be in (0, 100], or 0 for the task's default (1, the plain mean; 2 for breast-mg)")
    _check(0.0 <= f.server_momentum < 1.0, RunKey.SERVER_MOMENTUM,
           "must be in [0, 1): 0 is off, 0.9 is usual; or -1 for the task's default")
    _check(f.server_momentum == 0.0 or f.strategy in AVERAGING, RunKey.SERVER_MOMENTUM,
           f"{f.strategy.value} keeps its own moments; server-momentum is for fedavg, fedprox, fedmedian and "
           "fedtrimmedavg")
    _check(0.0 <= f.trim_beta < 0.5, RunKey.TRIM_BETA, "must be in [0, 0.5)")
    try:
        parse_rule(f.operating_point)
    except ValueError as exc:
        raise ConfigError(f"run-config key {str(RunKey.OPERATING_POINT)!r}: {exc}") from None
    if f.strategy == Strategy.FEDPROX:
        _check(t.proximal_mu > 0.0 or t.proximal_mu == AUTO_PROXIMAL_MU, RunKey.PROXIMAL_MU,
               "strategy fedprox needs proximal-mu > 0 (e.g. 0.01)")
    # Checked with DP off too: a site that trains only with DP-SGD uses them whatever the run asks.
    _check(0.0 < p.epsilon <= 100.0, RunKey.DP_EPSILON, "must be in (0, 100]; 1-10 is the usual range")
    _check(0.0 <= p.delta < 1e-2, RunKey.DP_DELTA, "must be 0 (choose below 1/samples) or a small value like 1e-5")
    _check(p.max_grad_norm > 0.0, RunKey.DP_MAX_GRAD_NORM, "must be above 0 (e.g. 1.0)")
    srv = config.server
    _check(srv.update_norm_factor >= 1.0, RunKey.UPDATE_NORM_FACTOR,
           "must be 1 or more (an update may be this many times the others' median norm); 10 is the default")
    _check(srv.round_timeout > 0.0, RunKey.ROUND_TIMEOUT, "must be above 0 seconds (e.g. 3600)")
    _check(srv.reconstruction_threshold >= 0, RunKey.RECONSTRUCTION_THRESHOLD, "must be 0 (min-sites - 1) or more")
    _check(srv.clipping_range > 0.0, RunKey.CLIPPING_RANGE, "must be above 0 (e.g. 8)")
    # A server step other than the aggregate itself moves every array of the model, BatchNorm's running statistics
    # too: a running variance stepped past the sites' values can turn negative.
    if m.norm == Norm.BATCH:
        _check(f.strategy in AVERAGING, RunKey.NORM,
               f"BatchNorm's running statistics cannot take {f.strategy.value}'s adaptive server step; use norm=group "
               "or norm=instance")
        _check(server_step(f) == 1.0 and f.server_momentum == 0.0, RunKey.NORM,
               "BatchNorm's running statistics cannot take a server step other than 1 or server momentum; use "
               "norm=group or norm=instance, or server-learning-rate=1 and server-momentum=0")
        _check(not srv.secure_aggregation, RunKey.NORM,
               "secure aggregation clips every value to clipping-range, BatchNorm's running statistics too; use "
               "norm=group or norm=instance")
    if p.enabled:
        _check(m.norm != Norm.BATCH, RunKey.NORM,
               "BatchNorm mixes samples of a batch, which DP-SGD cannot allow; use norm=group or norm=instance")
        _check(p.grad_sample_mode != GradSampleMode.EW or m.network == Arch.COMPACT_CNN, RunKey.DP_GRAD_SAMPLE_MODE,
               "'ew' does not work on DenseNet or the UNet; use hooks")
        _check(p.grad_sample_mode != GradSampleMode.GHOST or m.network != Arch.UNET, RunKey.DP_GRAD_SAMPLE_MODE,
               "ghost clipping needs a per-sample loss reduction the Dice loss does not have; use hooks")
