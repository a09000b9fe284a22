"""Local training and evaluation at a site, with optional DP-SGD. No federation code here.

Each federated round calls :func:`train_local` and :func:`evaluate_local`; the site-local baseline
(``oncofed-site train-local``) calls them over several epochs. Under DP, the noise multiplier is
calibrated once per run from the run's ε, δ and the steps the site plans over the whole run; the
session is checked against the site's ceiling and written ahead into its ledger with every step it
plans before the first step, then settled with the steps taken (a killed process over-counts, never
forgets).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fl_client.metrics import (
    BinaryMetrics,
    SegMetrics,
    StudySegmentation,
    binary_metrics,
    segmentation_metrics,
    study_scores,
    study_segmentation,
    without_small_lesions,
)
from fl_client.privacy import PrivacyLedger, default_delta, noise_for
from imaging.sitedata import SiteData
from models.config import FineTune, GradSampleMode, PrivacySpec, TrainSpec, resolve_batch, resolve_learning_rate
from models.device import Placement, autocast
from models.nets import set_trainable

__all__ = [
    "ByPatient",
    "DPPlan",
    "EvalResult",
    "Multiplied",
    "TrainResult",
    "TrainingError",
    "dp_sample_rate",
    "dp_steps",
    "evaluate_local",
    "evaluate_segmentation",
    "loader_options",
    "mean_over_copies",
    "plan_dp",
    "pos_weight_of",
    "predict",
    "predict_masks",
    "segmentation_loss",
    "train_local",
]


class TrainingError(Exception):
    """Training cannot start (no data, one class only...); the message names the site and task."""


@dataclass(frozen=True)
class DPPlan:
    """How a run trains under DP at this site: fixed for the whole run so every round uses the same noise."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    planned_steps: int
    epsilon_target: float
    grad_sample_mode: GradSampleMode
    accountant: str


def dp_sample_rate(samples: int, batch_size: int) -> float:
    """The Poisson sampling rate of DP-SGD, as Opacus' private loader sets it: one over the batches a pass of the
    plain loader takes, ``1 / ceil(samples / batch_size)`` (at most 1). The accountant, the ledger and the loader
    all count with this rate."""
    return 1.0 / max(1, math.ceil(max(samples, 1) / batch_size))


def dp_steps(sample_rate: float, *, epochs: int = 1) -> int:
    """Optimizer steps of ``epochs`` passes under Poisson sampling at ``sample_rate``: ``int(1 / q)`` per pass,
    computed as Opacus' sampler computes its length (its float rounding included: ``1 / (1 / 93)`` is just under
    93, so such a pass is 92 steps). The one formula the DP plan, the ledger's write-ahead and the training loop
    use, so what is reserved is what is taken."""
    return epochs * max(1, int(1 / sample_rate))


def plan_dp(privacy: PrivacySpec, *, samples: int, batch_size: int, steps_per_round: int, rounds: int,
            ledger: PrivacyLedger, grad_sample_mode: GradSampleMode) -> DPPlan:
    """Calibrate the noise for a run: its ε over all the steps the site plans to take in it.

    ``samples`` is the count of the training split's patients, DP-SGD's unit of privacy (:class:`ByPatient`).

    δ is the run's ``dp-delta`` if set, else the site budget's δ (which is below 1/samples by default).
    ``grad_sample_mode`` is the concrete Opacus mode (``models.config.resolved_grad_sample_mode``).

    Raises:
        NoBudget: The site has no ceiling.
    """
    budget = ledger.require_budget()
    delta = privacy.delta or budget.delta or default_delta(samples)
    sample_rate = dp_sample_rate(samples, batch_size)
    planned = steps_per_round * rounds
    noise = noise_for(epsilon=privacy.epsilon, delta=delta, sample_rate=sample_rate, steps=planned,
                      accountant=privacy.accountant.value)
    if grad_sample_mode == GradSampleMode.AUTO:
        raise ValueError("resolve 'auto' first: models.config.resolved_grad_sample_mode(config)")
    return DPPlan(noise, sample_rate, delta, privacy.max_grad_norm, planned, privacy.epsilon, grad_sample_mode,
                  privacy.accountant.value)


@dataclass(frozen=True)
class TrainResult:
    """What one local training session did."""

    loss: float
    num_examples: int  # training samples (not batches) in the split
    samples_seen: int
    steps: int
    seconds: float
    epsilon: float | None = None  # cumulative ε of the site after this session
    noise_multiplier: float | None = None


def _optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=0.9, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)


def pos_weight_of(labels: Sequence[int]) -> float:
    """Weight of the positive class in the loss: negatives / positives (1 if either is missing)."""
    pos = sum(1 for y in labels if y == 1)
    neg = len(labels) - pos
    return neg / pos if pos and neg else 1.0


def segmentation_loss() -> nn.Module:
    """The segmentation loss: Dice + binary cross-entropy on the voxel logits (MONAI's ``DiceCELoss`` with a
    sigmoid), Dice per sample, so each sample's loss depends on its own voxels only, as DP-SGD needs."""
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, batch=False, smooth_nr=1e-5, smooth_dr=1e-5)


class Multiplied(Dataset[Any]):
    """A dataset whose every item is ``k`` draws of the inner item, stacked: ``(images [k, ...], targets [k, ...])``.
    The inner dataset's random augmentations run once per draw, so the copies differ."""

    def __init__(self, inner: Dataset[Any], k: int) -> None:
        self.inner, self.k = inner, k

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        draws = [self.inner[index] for _ in range(self.k)]
        return torch.stack([torch.as_tensor(x) for x, _ in draws]), torch.stack([torch.as_tensor(y) for _, y in draws])


class ByPatient(Dataset[Any]):
    """DP-SGD's unit of privacy, the patient: one item per patient, each draw one of the patient's images picked at
    random (with its own augmentation).

    DP-SGD bounds what one *sample* can change in a step. With images as samples, a patient with two views, or with
    several studies, is several samples, and the ε the ledger records would hold for one image of a patient, not for
    the patient. Sampling patients (Poisson, at the plan's rate over the site's patients) and letting each sampled
    patient give one image's clipped gradient keeps every patient's contribution to a step within the clipping norm:
    the ε holds for the patient, whatever number of images the patient has. With augmentation multiplicity ``k``,
    each of the ``k`` copies picks its own image, so a patient's views are used side by side.

    Args:
        inner: The images.
        patients: The patient of each image of ``inner`` (``imaging.sitedata.SiteData.patients``).
        seed: Seeds the choice of image.
    """

    def __init__(self, inner: Dataset[Any], patients: Sequence[int], *, seed: int) -> None:
        images = len(inner)  # type: ignore[arg-type]
        if len(patients) != images:
            raise ValueError(f"{len(patients)} patient numbers for {images} images: give one per image")
        groups: dict[int, list[int]] = {}
        for index, patient in enumerate(patients):
            groups.setdefault(int(patient), []).append(index)
        self.inner, self.groups, self.seed = inner, list(groups.values()), seed
        self.rng = np.random.default_rng(seed)
        self.worker: int | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Any:
        info = torch.utils.data.get_worker_info()
        if info is not None and self.worker != info.seed:  # a loader worker (GPU): its own draws, not a copy's
            self.worker, self.rng = info.seed, np.random.default_rng([self.seed, info.seed])
        images = self.groups[index]
        return self.inner[images[int(self.rng.integers(len(images)))] if len(images) > 1 else images[0]]


def mean_over_copies(model: nn.Module, k: int) -> None:
    """Replace each parameter's per-sample gradients (Opacus' ``grad_sample``, one row per copy) by their mean over
    each sample's ``k`` consecutive copies: what DP-SGD then clips, sums and noises is one gradient per sample."""
    averaged = 0
    for p in model.parameters():
        rows = getattr(p, "grad_sample", None)
        if rows is None:
            continue
        if not isinstance(rows, torch.Tensor):
            raise TrainingError("augmentation multiplicity needs one backward pass per step")
        p.grad_sample = rows.reshape(-1, k, *rows.shape[1:]).mean(dim=1)
        averaged += 1
    if not averaged:  # each copy would be clipped on its own: k times the sensitivity the noise was set for
        raise TrainingError("augmentation multiplicity under DP-SGD found no per-sample gradients to average")


def train_local(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    spec: TrainSpec,
    labels: Sequence[int],
    global_params: Mapping[str, torch.Tensor] | None = None,
    dp: DPPlan | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "local",
    round_number: int = 0,
    task: str = "",
    epochs: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    placement: Placement | None = None,
    segmentation: bool = False,
    dp_seed: int | None = None,
    patients: Sequence[int] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``spec.local_epochs`` (or ``epochs``) passes over ``dataset``.

    Args:
        model: The network (not wrapped by Opacus).
        dataset: ``(image, label)`` pairs (``(image, mask)`` patches for segmentation).
        spec: The training recipe.
        labels: The dataset's labels, for the class weighting (classification).
        global_params: The round's global weights, for the FedProx term (used when ``proximal_mu > 0``).
        dp: A DP plan; the session is checked against and recorded in ``ledger``.
        ledger: The site's privacy ledger (required with ``dp``).
        run_id: Recorded in the ledger.
        round_number: Recorded in the ledger.
        task: Recorded in the ledger.
        epochs: Overrides ``spec.local_epochs``.
        on_epoch: Called as ``on_epoch(epoch, mean training loss of the epoch)`` after each epoch
            (the model is in eval mode during the call).
        placement: The device and precision (:func:`models.device.place`; default the CPU in fp32). The model is
            moved there for training and back to the CPU after it.
        segmentation: The model segments: voxel logits against masks, with :func:`segmentation_loss`.
        dp_seed: Under DP, seeds the noise and the Poisson sampling of batches: for tests and benchmarks only. None
            (what a site does) draws both seeds from the operating system's entropy at every session: the run
            config's ``seed`` is the lead's, and noise or batches the lead could replay would void the guarantee
            (the noise could be subtracted, and subsampling amplifies privacy only while the batches are secret).
        patients: The patient of each item of ``dataset`` (``imaging.sitedata.SiteData.patients``); required with
            ``dp``. DP-SGD then samples patients, one random image each (:class:`ByPatient`), and ``dp`` must be
            planned for the patients' count: the ε holds per patient.

    Raises:
        TrainingError: An empty dataset.
        BudgetExceeded: Under DP, the session would pass the site's ceiling (nothing trained).
        ValueError: DP without ``patients``, or a plan made for another count of patients.
    """
    n = images = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise TrainingError("the training split is empty")
    epochs = epochs or spec.local_epochs
    if spec.threads:
        torch.set_num_threads(spec.threads)
    placement = placement or Placement(torch.device("cpu"))
    device = placement.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the input size is fixed by the preset
    model.to(device)
    seed = spec.seed + 7919 * round_number
    noise_generator = None
    if dp is not None:
        # The site's secret: batches and noise nobody outside the site can replay (see ``dp_seed``).
        seed = int.from_bytes(os.urandom(8), "little") >> 1 if dp_seed is None else dp_seed
        noise_generator = torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)
    generator = torch.Generator().manual_seed(seed)
    if dp is not None:
        if patients is None:
            raise ValueError("a DP session needs the patient of each image (patients=...): DP-SGD samples patients")
        dataset = ByPatient(dataset, patients, seed=seed ^ 0x9E3779B9)
        n = len(dataset)
    copies = spec.augmentation_multiplicity
    if copies > 1 and dp is not None and dp.grad_sample_mode == GradSampleMode.GHOST:
        raise TrainingError("augmentation multiplicity needs per-sample gradients, which Opacus' ghost mode keeps "
                            "none of: use the ew, hooks or functorch mode")
    if copies > 1:
        dataset = Multiplied(dataset, copies)
    batch = resolve_batch(spec.batch_size, dp=dp is not None)
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=min(batch, n), shuffle=True, drop_last=False,
                                         generator=generator, **loader_options(device))
    # Under DP-SGD the classes weigh alike: a weight from the split's labels would let one patient's label change
    # every other patient's clipped gradient, which the noise is not calibrated for.
    pos_weight = 1.0 if dp is not None else pos_weight_of(labels)
    criterion: Any = (segmentation_loss() if segmentation else
                      nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=device)))
    spec = replace(spec, learning_rate=resolve_learning_rate(spec.learning_rate, segmentation=segmentation,
                                                             dp=dp is not None, task=task))
    set_trainable(model, spec.fine_tune)  # before the optimiser and Opacus see the parameters
    try:  # a set-up that fails leaves every parameter trainable again
        optimizer = _optimizer(model, spec)
        scaler = torch.amp.GradScaler(device.type) if placement.scaled and dp is None else None
        model.train()  # Opacus refuses a model in eval mode (as left by the previous round's evaluation)
        trained: nn.Module = model
        steps_per_epoch = len(loader)
        reservation = None
        if dp is not None:
            if ledger is None:
                raise ValueError("a DP session needs the site's ledger")
            # Refused now if it would pass the ceiling (nothing trained); written ahead just before the first step.
            ledger.check(noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate,
                         steps=dp_steps(dp.sample_rate, epochs=epochs), accountant=dp.accountant)
            from opacus import PrivacyEngine

            engine = PrivacyEngine(accountant=dp.accountant)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
                warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
                common: dict[str, Any] = dict(module=model, optimizer=optimizer, data_loader=loader,
                                              noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                                              poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode.value,
                                              noise_generator=noise_generator)
                if dp.grad_sample_mode == GradSampleMode.GHOST:
                    trained, optimizer, criterion, loader = engine.make_private(criterion=criterion, **common)
                else:
                    trained, optimizer, loader = engine.make_private(**common)
            steps_per_epoch = dp_steps(dp.sample_rate)
            actual = getattr(loader, "sample_rate", dp.sample_rate)
            if abs(actual - dp.sample_rate) > 1e-12 or len(loader) != steps_per_epoch:
                raise ValueError(f"the DP plan samples at {dp.sample_rate:.6g} for {steps_per_epoch} steps a pass; the "
                                 f"private loader at {actual:.6g} for {len(loader)}: plan with the loader's batch size "
                                 f"and the split's {n} patients (SiteData.count_patients), not its {images} images")
        prox = spec.proximal_mu if global_params is not None and spec.proximal_mu > 0 else 0.0
        anchors = ({k: v.detach().to(device).clone() for k, v in global_params.items()}
                   if prox and global_params is not None else {})
        named = dict(model.named_parameters())
        trained.train()
        progress = {"loss": 0.0, "seen": 0, "steps": 0}

        def run_epochs() -> None:
            total_loss, seen, steps = 0.0, 0, 0
            for epoch in range(epochs):
                epoch_loss, epoch_seen = 0.0, 0
                batches = iter(loader)
                for _ in range(steps_per_epoch):
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    if len(x) == 0:  # Poisson sampling may draw an empty batch: it still counts as a step
                        steps += 1
                        progress["steps"] = steps
                        continue
                    if copies > 1:  # [samples, copies, ...] -> one row per copy, a sample's copies side by side
                        x, y = x.flatten(0, 1), y.flatten(0, 1)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(placement):
                        logits = trained(x)
                    loss = criterion(logits.float(), y)  # the loss in fp32 whatever the forward pass ran in
                    if prox and dp is None:
                        loss = loss + prox / 2 * sum(((named[k] - a) ** 2).sum() for k, a in anchors.items()
                                                     if k in named)
                    if scaler is not None:  # fp16: scaled against gradient underflow
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        if dp is not None and copies > 1:
                            mean_over_copies(trained, copies)
                        optimizer.step()
                    if prox and dp is not None:
                        # Under DP the proximal term is applied as its own step after the private update: it
                        # depends only on the public global weights, so it costs no privacy.
                        with torch.no_grad():
                            for k, a in anchors.items():
                                if k in named:
                                    named[k].sub_(spec.learning_rate * prox * (named[k] - a))
                    epoch_loss += float(loss.detach()) * len(x) / copies
                    epoch_seen += len(x) // copies
                    steps += 1
                    progress["steps"] = steps
                total_loss += epoch_loss
                seen += epoch_seen
                if on_epoch is not None:
                    trained.eval()
                    on_epoch(epoch, epoch_loss / max(epoch_seen, 1))
                    trained.train()
            progress.update(loss=total_loss, seen=seen, steps=steps)

        if dp is not None and ledger is not None:
            # Written ahead: the ledger holds every step this session may take before the first one is taken.
            reservation = ledger.reserve(run_id=run_id, round=round_number, task=task,
                                         steps=dp_steps(dp.sample_rate, epochs=epochs), sample_rate=dp.sample_rate,
                                         noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
                                         samples=n, accountant=dp.accountant)
    except BaseException:
        set_trainable(model, FineTune.ALL)
        raise
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Opacus' hooks make torch warn about full backward hooks on every step: expected.
            warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
            warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
            run_epochs()
    finally:
        # Under DP every step taken counts, even if training stopped half-way: settle the reservation with the
        # steps taken (a process killed before this line leaves the whole reservation counted).
        steps = int(progress["steps"])
        session_epsilon = None
        if reservation is not None and ledger is not None:
            session_epsilon = ledger.settle(reservation, steps=steps).epsilon_cumulative
        close = getattr(trained, "_close", None)
        if dp is not None and callable(close):
            close()  # remove Opacus' hooks so the plain model can be reused
        set_trainable(model, FineTune.ALL)  # saliency and a later session take gradients through every layer
    seconds = time.perf_counter() - t0
    total_loss, seen = float(progress["loss"]), int(progress["seen"])
    model.eval()
    model.to("cpu")
    return TrainResult(loss=total_loss / max(seen, 1), num_examples=images, samples_seen=seen, steps=steps,
                       seconds=seconds, epsilon=session_epsilon,
                       noise_multiplier=dp.noise_multiplier if dp else None)


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader options for a device: on a GPU, worker processes and pinned memory so that the next batch is
    read and copied while the GPU computes; on the CPU, none (the CPU does both and workers would compete)."""
    if device.type != "cuda":
        return {"num_workers": 0}
    workers = max(1, min(4, (os.cpu_count() or 2) // 2))
    return {"num_workers": workers, "pin_memory": True, "persistent_workers": False}


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 16,
            placement: Placement | None = None) -> np.ndarray:
    """Probabilities of the positive class, in dataset order (computed on ``placement``; the model is left on the
    device it was on)."""
    placement = placement or Placement(torch.device("cpu"))
    model.eval()
    was = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(placement.device)
    out = []
    try:
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(placement.device)):
            with autocast(placement):
                logits = model(x.to(placement.device, non_blocking=True))
            out.append(torch.sigmoid(logits.float()).squeeze(1).cpu().numpy())
    finally:
        model.to(was)
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def predict_masks(model: nn.Module, dataset: Dataset[Any], *, roi_size: Sequence[int],
                  placement: Placement | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, float]]:
    """Lesion probabilities of a segmentation model over each whole input, by MONAI's sliding-window inference
    with patches of ``roi_size`` (a quarter overlap, Gaussian-weighted), in dataset order.

    Yields:
        ``(probabilities, target mask, loss)`` per sample: arrays of the input's spatial shape, and the sample's
        segmentation loss.
    """
    from monai.inferers import sliding_window_inference

    placement = placement or Placement(torch.device("cpu"))
    model.eval()
    was = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(placement.device)
    criterion = segmentation_loss()
    try:
        for x, y in DataLoader(dataset, batch_size=1, shuffle=False, **loader_options(placement.device)):
            x = x.to(placement.device, non_blocking=True)
            with autocast(placement):
                logits = sliding_window_inference(x, roi_size=tuple(roi_size), sw_batch_size=4, predictor=model,
                                                  overlap=0.25, mode="gaussian")
            logits = torch.as_tensor(logits).float().cpu()
            loss = float(criterion(logits, y))
            yield torch.sigmoid(logits)[0, 0].numpy(), y[0, 0].numpy() > 0.5, loss
    finally:
        model.to(was)


@dataclass(frozen=True)
class EvalResult:
    """Study-level metrics of one split, the image count behind them and, for a classifier, the studies' labels
    and scores (which stay at the site: only their histograms on fixed bins may leave)."""

    metrics: BinaryMetrics | SegMetrics
    images: int
    seconds: float
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    study_uids: tuple[str, ...] = ()


def evaluate_local(model: nn.Module, data: SiteData, split: str, *, threshold: float = 0.5,
                   batch_size: int = 16, placement: Placement | None = None) -> EvalResult | None:
    """Evaluate on a split (None if the split is empty). Images of one study count as one study,
    scored by its highest image probability; for a segmentation task see :func:`evaluate_segmentation`."""
    if data.count(split) == 0:
        return None
    if data.segmentation:
        return evaluate_segmentation(model, data, split, threshold=threshold, placement=placement)
    t0 = time.perf_counter()
    dataset = data.dataset(split, train=False)
    probs = predict(model, dataset, batch_size=batch_size, placement=placement)
    labels = data.labels(split)
    loss = float(nn.functional.binary_cross_entropy(torch.tensor(probs).clamp(1e-6, 1 - 1e-6),
                                                    torch.tensor(labels, dtype=torch.float32)))
    uids, y, p = study_scores(data.study_uids(split), labels, probs.tolist())
    return EvalResult(binary_metrics(y, p, threshold=threshold, loss=loss), images=len(labels),
                      seconds=time.perf_counter() - t0, labels=y, scores=p, study_uids=tuple(uids))


def evaluate_segmentation(model: nn.Module, data: SiteData, split: str, *, threshold: float = 0.5,
                          placement: Placement | None = None) -> EvalResult | None:
    """Segmentation metrics of a split, per study (the images of a mammography study pooled), on the network's
    grid at the preset's voxel size: Dice, lesion-wise sensitivity, false-positive lesions per study, HD95 and the
    Dice + cross-entropy loss (None if the split is empty). Predicted lesions below the preset's smallest lesion
    (``min_lesion_mm``) are dropped first, as they are from the masks ``predict`` writes."""
    from imaging.presets import get_preset

    if data.count(split) == 0:
        return None
    preset = get_preset(data.task, data.resolution)
    roi = preset.patch_size or preset.spatial_size
    t0 = time.perf_counter()
    per_image: list[tuple[str, np.ndarray, np.ndarray]] = []
    losses = []
    for uid, (prob, target, loss) in zip(data.study_uids(split), predict_masks(
            model, data.dataset(split, train=False), roi_size=roi, placement=placement), strict=True):
        pred = without_small_lesions(prob >= threshold, spacing=preset.target_spacing,
                                     min_diameter_mm=preset.min_lesion_mm)
        per_image.append((uid, pred, target))
        losses.append(loss)
    studies: list[StudySegmentation] = []
    by_study: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for uid, pred, target in per_image:
        by_study.setdefault(uid, []).append((pred, target))
    for uid in sorted(by_study):
        figures = [study_segmentation(p, t, spacing=preset.target_spacing) for p, t in by_study[uid]]
        if len(figures) == 1:
            studies.append(figures[0])
            continue
        overlap = sum(2 * float((p & t).sum()) for p, t in by_study[uid])
        volume = sum(float(p.sum() + t.sum()) for p, t in by_study[uid])
        lesions = sum(f.lesions for f in figures)
        hds = [f.hd95 for f in figures if f.hd95 is not None]
        studies.append(StudySegmentation(dice=overlap / volume if lesions and volume else None,
                                         hd95=float(np.mean(hds)) if hds else None, lesions=lesions,
                                         found=sum(f.found for f in figures),
                                         false_positives=sum(f.false_positives for f in figures)))
    return EvalResult(segmentation_metrics(studies, loss=float(np.mean(losses)), threshold=threshold),
                      images=len(per_image), seconds=time.perf_counter() - t0)
