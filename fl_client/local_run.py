"""A site-local (or pooled, centralised) training run: the baseline federated results are compared to.

Writes into the output folder: ``model.pt`` (weights, the run configuration, and for a classifier the operating
point and Platt scaling chosen on the validation split, which ``explain`` and the review page read), ``metrics.json``
(schema ``oncofed.local-run/1``: per split the study-level metrics and the number of studies behind
them, the per-epoch curve, timings, and ε under DP) and ``curves.png`` (training loss and validation
AUROC per epoch).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.privacy import PrivacyLedger
from fl_client.subgroups import study_subgroups, subgroup_figures
from fl_client.train import (
    DPPlan,
    TrainingError,
    dp_sample_rate,
    dp_steps,
    evaluate_local,
    plan_dp,
    train_local,
)
from imaging.sitedata import load_site_data
from models.config import RunConfig, batch_size_of, dp_outlook, resolve_learning_rate, resolved_grad_sample_mode
from models.device import place
from models.evaluation import HeldOutFigures, Scoring, choose_threshold, fit_platt, parse_rule
from models.nets import build_model, parameter_count
from models.weights import save_checkpoint, state_arrays

__all__ = ["run_local"]

SCHEMA = "oncofed.local-run/1"


def run_local(
    workspaces: Sequence[Path],
    config: RunConfig,
    out: Path,
    *,
    epochs: int,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    device: str = "cpu",
    precision: str = "auto",
    on_warning: Callable[[str], None] | None = None,
    dp_seed: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate on the workspaces' data (pooled if several) and write the results.

    Args:
        workspaces: One site workspace, or several for the centralised baseline.
        config: The run configuration (task, model, recipe, DP request).
        out: Output folder (created).
        epochs: Passes over the training split.
        on_epoch: Called as ``on_epoch(epoch, training loss, validation AUROC (Dice for segmentation) or None)``.
        device: Where training and evaluation run: auto, cpu, cuda or cuda:N (default the CPU).
        precision: auto (mixed precision on a GPU, fp32 on the CPU), fp32, bf16 or fp16.
        on_warning: Called before the first step with a sentence when DP-SGD's noise at this site's sample count
            makes learning unlikely (:func:`models.config.dp_outlook`).
        dp_seed: Seeds DP-SGD's noise and batches, for tests only (see :func:`fl_client.train.train_local`); None
            draws them from the operating system's entropy.

    Returns:
        The metrics document written to ``metrics.json``.

    Raises:
        NoSiteData: A workspace holds no labelled data of both classes for the task.
        TrainingError: DP asked for on pooled workspaces.
        NoBudget / BudgetExceeded: Under DP, the site's ceiling is missing or would be passed.
        DeviceError: The device does not exist here, or cannot run the precision.
    """
    task = config.model.task
    data = load_site_data(workspaces, task, resolution=config.model.resolution)
    if config.privacy.enabled and len(workspaces) != 1:
        raise TrainingError("DP-SGD is accounted per site: train one workspace at a time with --dp-epsilon "
                            "(the pooled run is the centralised baseline, without DP)")
    torch.manual_seed(config.training.seed)
    model = build_model(config.model)
    train_set = data.dataset("train", train=config.training.augment, seed=config.training.seed)
    samples = data.count("train")
    patients = data.count_patients("train")  # DP-SGD's unit of privacy (fl_client.train.ByPatient)
    ledger = PrivacyLedger(workspaces[0]) if config.privacy.enabled else None
    dp: DPPlan | None = None
    if ledger is not None:
        rate = dp_sample_rate(patients, batch_size_of(config))
        dp = plan_dp(config.privacy, samples=patients, batch_size=batch_size_of(config),
                     steps_per_round=dp_steps(rate, epochs=epochs), rounds=1, ledger=ledger,
                     grad_sample_mode=resolved_grad_sample_mode(config))
    outlook = dp_outlook(dp.noise_multiplier, dp.sample_rate * patients) if dp is not None else None
    if outlook and on_warning is not None:
        on_warning(outlook)  # before the first step: the operator can stop now
    placement = place(device, precision, dp_mode=dp.grad_sample_mode.value if dp is not None else None)
    curve: list[dict[str, float | None]] = []

    headline = "dice" if data.segmentation else "auroc"

    def after_epoch(epoch: int, loss: float) -> None:
        val = evaluate_local(model, data, "val", placement=placement)
        score = getattr(val.metrics, headline) if val else None
        curve.append({"epoch": epoch + 1, "train_loss": loss, f"val_{headline}": score,
                      "val_loss": val.metrics.loss if val else None})
        if on_epoch is not None:
            on_epoch(epoch, loss, score)

    t0 = time.perf_counter()
    result = train_local(model, train_set, spec=config.training, labels=data.labels("train"), dp=dp, ledger=ledger,
                         run_id=f"local-{uuid.uuid4().hex[:8]}", task=task, epochs=epochs, on_epoch=after_epoch,
                         placement=placement, segmentation=data.segmentation, dp_seed=dp_seed,
                         patients=data.patients("train"))
    train_seconds = time.perf_counter() - t0
    splits = {}
    operating: dict[str, Any] | None = None
    threshold = 0.5
    scoring: Scoring | None = None
    if not data.segmentation:
        # The operating point: chosen on the validation split by the run's rule, then applied to every split; and
        # Platt scaling fitted on the same studies' scores (where they hold enough of each class), which the
        # model.pt carries as a federated run's global model does.
        rule = parse_rule(config.federation.operating_point)
        val = evaluate_local(model, data, "val", placement=placement)
        calibration = None
        both = False  # validation studies of both classes: the rule could choose
        if val is not None and val.labels is not None and val.scores is not None:
            threshold = choose_threshold(val.labels, val.scores, rule)
            both = len(set(np.asarray(val.labels, int).tolist())) == 2
            clipped = np.clip(np.asarray(val.scores, float), 1e-7, 1 - 1e-7)
            calibration = fit_platt(val.labels, np.log(clipped) - np.log1p(-clipped),
                                    fitted_on="validation studies of this run")
        operating = {"rule": str(rule), "rule_text": rule.describe(), "threshold": threshold,
                     "chosen_on": "val" if val is not None else "no validation split: 0.5",
                     "calibration": calibration.to_dict() if calibration is not None else None}
        # A threshold above every score (1 + 1e-9: the rule calls nothing positive) is kept as 1.0 in the model.pt.
        scoring = Scoring(calibration, min(threshold, 1.0),
                          rule.describe() if both or rule.kind == "fixed" else
                          "no validation studies of both classes: 0.5")
    subgroups: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        ev = evaluate_local(model, data, split, placement=placement, threshold=threshold)
        if ev is not None:
            splits[split] = {**ev.metrics.as_dict(), "images": ev.images}
            if split == "test" and ev.labels is not None and ev.scores is not None:
                subgroups = subgroup_figures(study_subgroups(data, split), ev.study_uids, ev.labels, ev.scores,
                                             min_count=1)  # the site's own view: every subgroup
    test = splits.get("test") if not data.segmentation else None
    tested = None if test is None else HeldOutFigures("test", int(test["studies"]), int(test["positives"]),
                                                      test["auroc"], test["auroc_low"], test["auroc_high"])
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", state_arrays(model), config.to_flat(), round_number=0, scoring=scoring,
                    tested=tested)  # a lead who starts a federated run from this model reads how it scored
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "task": task,
        "workspaces": [str(w) for w in workspaces],
        "run_config": {**config.to_flat(),  # the rate it trained at, not the "default" sentinel
                       "learning-rate": resolve_learning_rate(config.training.learning_rate,
                                                              segmentation=data.segmentation,
                                                              dp=config.privacy.enabled, task=task)},
        "parameters": parameter_count(model),
        "ran_on": placement.describe(),
        "epochs": epochs,
        "training_samples": samples,
        "train_seconds": train_seconds,
        "samples_per_second": result.samples_seen / max(result.seconds, 1e-9),
        "steps": result.steps,
        "splits": splits,
        "operating_point": operating,
        "subgroups_test": subgroups,
        "curve": curve,
        "privacy": ({**asdict(dp), "grad_sample_mode": dp.grad_sample_mode.value,
                     "epsilon_site_cumulative": result.epsilon, "warning": outlook} if dp else None),
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
    _plot(out / "curves.png", curve, task, headline)
    return doc


def _plot(path: Path, curve: list[dict[str, float | None]], task: str, headline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [c["epoch"] for c in curve]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(epochs, [c["train_loss"] for c in curve], marker="o", label="train")
    ax[0].plot(epochs, [c["val_loss"] for c in curve], marker="o", label="validation")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss")
    ax[0].legend()
    ax[1].plot(epochs, [c[f"val_{headline}"] for c in curve], marker="o", color="tab:green")
    if headline == "auroc":
        ax[1].axhline(0.5, color="grey", linestyle=":", label="chance")
        ax[1].legend()
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation AUROC (studies)" if headline == "auroc" else "validation Dice (studies with a lesion)")
    fig.suptitle(f"{task}: local training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
