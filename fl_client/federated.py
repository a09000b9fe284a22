"""What a site does in a federated round, with no ``flwr`` import (the ClientApp is a thin shell).

The global model travels as one flat float32 array under the key :data:`models.protocol.WEIGHTS` (Flower's transfer cost
is per array, not per byte); the site rebuilds the state dict from its own model's key order and
shapes. Every reply passes the egress guard and is logged before it leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_client.egress import EgressLog, check_reply
from fl_client.metrics import SegMetrics
from fl_client.policy import Admission, RunBook, RunManifest
from fl_client.privacy import Budget, BudgetExceeded, NoBudget, PrivacyLedger
from fl_client.subgroups import study_subgroups, subgroup_figures, subgroup_metrics
from fl_client.train import dp_sample_rate, dp_steps, evaluate_local, plan_dp, train_local
from imaging.sitedata import NoSiteData, SiteData, load_site_data
from models.config import (
    ConfigError,
    Norm,
    RunConfig,
    dp_outlook,
    proximal_mu_of,
    resolve_batch,
    resolve_learning_rate,
    resolved_grad_sample_mode,
)
from models.device import Placement, place
from models.evaluation import score_histogram
from models.nets import build_model, parameter_count, set_trainable
from models.protocol import (
    EVAL_METRICS,
    PRIVACY_METRICS,
    TRAIN_METRICS,
    WEIGHTS,
    Metric,
    NodeKey,
    Refusal,
    SiteKey,
    Split,
    failure_text,
    histogram_metrics,
)
from models.weights import WeightsError, load_arrays, pack, state_arrays, unpack

log = logging.getLogger("oncofed.site")

__all__ = [
    "Refused",
    "Reply",
    "Site",
    "SiteConfigError",
    "admit",
    "evaluate",
    "fit",
    "refusal",
    "run_manifest",
    "site_from_config",
    "steps_per_round",
]


class SiteConfigError(ValueError):
    """The SuperNode's node config does not say where the site's workspace is."""


class Refused(Exception):
    """The site does not take part in this message (raised where the reply cannot say so itself: Flower's
    SecAgg+ workflow knows only drop-outs). The text is written by the site's code and leaves the site.

    Args:
        site_id: The site.
        code: A :class:`models.protocol.Refusal` code.
        detail: A sentence with no path, identifier or tag value.
    """

    def __init__(self, site_id: str, code: str, detail: str) -> None:
        super().__init__(failure_text(site_id, code or Refusal.REFUSED, detail))
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Site:
    """One hospital site: its id, its workspace folder, and where its models run (its own settings, from its
    SuperNode's node config: ``device`` auto/cpu/cuda[:N], ``precision`` auto/fp32/bf16/fp16)."""

    site_id: str
    workspace: Path
    device: str = "auto"
    precision: str = "auto"

    def placement(self, *, dp_mode: str | None = None) -> Placement:
        """Where and how this site runs a model (see :func:`models.device.place`).

        Raises:
            DeviceError: The site's device or precision cannot run here.
        """
        return place(self.device, self.precision, dp_mode=dp_mode)


@dataclass(frozen=True)
class Reply:
    """What a site sends back: arrays, whitelisted scalar metrics and a few short strings."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    strings: dict[str, str] = field(default_factory=dict)
    # The received global model's metrics on another split, sent in the same message (saves a round
    # trip: in a deployment every message starts a new ClientApp process).
    evaluation: dict[str, float] = field(default_factory=dict)
    # The site's data summary (a reply to the lead's query; keys of models.protocol.summary_keys).
    summary: dict[str, float] = field(default_factory=dict)


def site_from_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> Site:
    """The site this process serves.

    In deployment the SuperNode's ``--node-config`` names it: ``workspace="/srv/ws" site-id="a"``.
    In simulation Flower gives each virtual node only ``partition-id``: the run-config key
    ``sim-sites`` names a folder whose sub-folders (sorted) are the site workspaces, and partition
    ``i`` is the ``i``-th of them. A node config ``workspace`` always wins.

    Raises:
        SiteConfigError: Neither is set, or the folder does not exist.
    """
    if node_config.get(NodeKey.WORKSPACE):
        ws = Path(str(node_config[NodeKey.WORKSPACE])).expanduser()
        site_id = str(node_config.get(NodeKey.SITE_ID) or ws.name)
    elif run_config.get("sim-sites"):
        root = Path(str(run_config["sim-sites"])).expanduser()
        sites = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        pid = int(node_config.get(NodeKey.PARTITION_ID, -1))
        if not 0 <= pid < len(sites):
            raise SiteConfigError(f"simulation partition {pid} has no workspace in {root} "
                                  f"({len(sites)} site folders): use as many supernodes as site folders")
        ws, site_id = sites[pid], sites[pid].name
    else:
        raise SiteConfigError("this SuperNode has no workspace: start it with "
                              "--node-config 'workspace=\"/path/to/ws\" site-id=\"a\"'")
    if not ws.is_dir():
        raise SiteConfigError(f"site workspace {ws} does not exist: ingest the site's DICOM first "
                              "(oncofed-site ingest --workspace ...)")
    return Site(site_id, ws, device=str(node_config.get(NodeKey.DEVICE) or "auto"),
                precision=str(node_config.get(NodeKey.PRECISION) or "auto"))


def run_manifest(config: RunConfig, run_config: Mapping[str, Any], node_config: Mapping[str, Any], *, run: str,
                 lead_run_id: str) -> RunManifest:
    """What the run asks of the site, read by the site's code from the run config (see
    :class:`fl_client.policy.RunManifest`)."""
    metrics = TRAIN_METRICS + EVAL_METRICS + (PRIVACY_METRICS if config.privacy.enabled else ())
    network = build_model(config.model)
    total = parameter_count(network)
    set_trainable(network, config.training.fine_tune)
    return RunManifest(
        run=run, lead_run_id=lead_run_id, task=config.model.task, rounds=config.federation.num_rounds,
        local_epochs=config.training.local_epochs, strategy=str(config.federation.strategy),
        network=str(config.model.network), parameters=total, trained=parameter_count(network),
        fine_tune=config.training.fine_tune.value,
        resolution=str(config.model.resolution),
        augmentation_multiplicity=config.training.augmentation_multiplicity,
        dp=config.privacy.enabled, dp_epsilon=float(config.privacy.epsilon),
        secure_aggregation=config.server.secure_aggregation,
        metrics=metrics, app=str(node_config.get(NodeKey.APP_BUNDLE) or "simulation"),
        app_hash=str(node_config.get(NodeKey.APP_BUNDLE_SHA256) or ""))


def admit(site: Site, config: RunConfig, run_config: Mapping[str, Any], node_config: Mapping[str, Any], *, run: str,
          lead_run_id: str, final: bool = False) -> Admission:
    """The site's decision on one message of a run: its policy, then its approval (see
    :meth:`fl_client.policy.RunBook.admit`). The manifest is built only the first time a run is seen."""
    book = RunBook(site.workspace)
    known = book.get(run)
    manifest = known.manifest if known is not None else run_manifest(config, run_config, node_config, run=run,
                                                                      lead_run_id=lead_run_id)
    return book.admit(manifest, final=final)


def refusal(site: Site, *, task: str, run_id: str, round_number: int, kind: str, code: str, detail: str) -> Reply:
    """A refusal reply: no weights, no figures, the reason code and the site's sentence (logged as sent)."""
    strings = {SiteKey.SITE_ID: site.site_id, SiteKey.REFUSAL: code, SiteKey.DETAIL: detail}
    if task:
        strings[SiteKey.TASK] = task[:64]
    reply = Reply(metrics={Metric.REFUSED: 1, Metric.NUM_EXAMPLES: 0}, strings=strings)
    return _send(site, run_id=run_id, round_number=round_number, kind=f"{kind}-refused", reply=reply, reference=None)


def data_summary(site: Site, *, run_id: str) -> Reply:
    """The site's data summary for the lead (``Reply.summary``), or a refusal if its policy does not
    share one; checked by the egress guard and logged as kind ``summary``."""
    from fl_client.summary import site_summary

    policy = RunBook(site.workspace).policy()
    strings = {SiteKey.SITE_ID: site.site_id}
    if not policy.share_summary:
        reply = Reply(metrics={Metric.REFUSED: 1, Metric.NUM_EXAMPLES: 0},
                      strings={**strings, SiteKey.REFUSAL: Refusal.NO_SUMMARY,
                               SiteKey.DETAIL: "this site does not share a data summary"})
        return _send(site, run_id=run_id, round_number=0, kind="summary-refused", reply=reply, reference=None)
    summary = site_summary(site.workspace, min_count=policy.min_count)
    reply = Reply(metrics={Metric.NUM_EXAMPLES: 0}, strings=strings, summary=summary)
    check_reply({}, reply.metrics, reference=None, strings=reply.strings, summary=summary)
    EgressLog(site.workspace).append(run=run_id, round_number=0, kind="summary", arrays={}, metrics=summary,
                                     strings=reply.strings)
    return reply


def _model_from(config: RunConfig, flat: np.ndarray) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    model = build_model(config.model)
    reference = state_arrays(model)
    try:
        arrays = unpack(np.asarray(flat), reference)
    except WeightsError:
        m, need = config.model, sum(a.size for a in reference.values())
        raise ConfigError(f"the global model has {np.asarray(flat).size:,} values; this site builds {m.network} for "
                          f"{m.task} at the {m.resolution} resolution profile with {need:,}: the lead and this site "
                          "disagree on the model (its version or run configuration)") from None
    load_arrays(model, arrays)
    return model, {WEIGHTS: np.asarray(flat)}


def _send(site: Site, *, run_id: str, round_number: int, kind: str, reply: Reply,
          reference: Mapping[str, np.ndarray] | None) -> Reply:
    check_reply(reply.arrays, reply.metrics, reference=reference, strings=reply.strings)
    check_reply({}, reply.evaluation, reference=None)
    EgressLog(site.workspace).append(run=run_id, round_number=round_number, kind=kind, arrays=reply.arrays,
                                     metrics=reply.metrics, strings=reply.strings)
    return reply


def steps_per_round(config: RunConfig, samples: int) -> int:
    """DP-SGD steps a site takes per round (the DP plan's unit; see :func:`fl_client.train.dp_steps`), at the
    run's DP batch (also where the site's own policy turns DP on for a run that did not ask for it)."""
    return dp_steps(dp_sample_rate(samples, resolve_batch(config.training.batch_size, dp=True)),
                    epochs=config.training.local_epochs)


def fit(site: Site, config: RunConfig, *, run_id: str, round_number: int, global_flat: np.ndarray,
        proximal_mu: float = 0.0, evaluate_split: str | None = None, epsilon_cap: float | None = None) -> Reply:
    """Train the global model on the site's training split for one round.

    A site with no data for the task, or whose privacy budget would be passed, answers with a
    refusal (``refused`` = 1 and why, no arrays): nothing trained, nothing else sent.

    Args:
        site: The site.
        config: The run configuration.
        run_id: The run, for the ledger and the egress log.
        round_number: The server round.
        global_flat: The global weights, packed.
        proximal_mu: FedProx's proximal term, from the round's config (0: none).
        evaluate_split: First evaluate the received global model on this split and send its metrics
            with the reply (``Reply.evaluation``; logged as its own egress record).
        epsilon_cap: The site policy's most ε per run (caps the run's own DP target).
    """
    if round_number > config.federation.num_rounds:
        # The site planned (DP noise, per-run ε) and approved this run for its count of rounds, as it reads the run
        # config; a round past it would spend what was never planned.
        return refusal(site, task=config.model.task, run_id=run_id, round_number=round_number, kind="train",
                       code=Refusal.ROUNDS, detail=f"round {round_number} is past the {config.federation.num_rounds} "
                                                   "rounds this site planned and approved for the run")
    # One model and one look at the catalog for both jobs of the message: the evaluation reads the received
    # weights before training changes them.
    torch.manual_seed(config.training.seed + round_number)
    model, reference = _model_from(config, global_flat)
    data = _site_data(site, config)
    evaluation = (_evaluate(site, config, model, data, run_id=run_id, round_number=round_number - 1,
                            split=evaluate_split).metrics if evaluate_split else {})
    strings = {SiteKey.SITE_ID: site.site_id, SiteKey.TASK: config.model.task}
    if data is None:
        reply = Reply(metrics={Metric.REFUSED: 1, Metric.REFUSED_NO_DATA: 1, Metric.NUM_EXAMPLES: 0},
                      strings={**strings, SiteKey.REFUSAL: Refusal.NO_DATA,
                               SiteKey.DETAIL: "no training data for the task"},
                      evaluation=evaluation)
        return _send(site, run_id=run_id, round_number=round_number, kind="train-refused", reply=reply, reference=None)
    reply = _train(site, config, model, reference, data, run_id=run_id, round_number=round_number,
                   proximal_mu=proximal_mu, strings=strings, epsilon_cap=epsilon_cap)
    return replace(reply, evaluation=evaluation)


def _site_data(site: Site, config: RunConfig) -> SiteData | None:
    """The site's labelled data for the run's task, or None if it holds none."""
    try:
        return load_site_data([site.workspace], config.model.task, resolution=config.model.resolution)
    except NoSiteData:
        return None


def _train(site: Site, config: RunConfig, model: torch.nn.Module, reference: dict[str, np.ndarray], data: SiteData,
           *, run_id: str, round_number: int, proximal_mu: float, strings: dict[str, str],
           epsilon_cap: float | None) -> Reply:
    patients = data.count_patients("train")  # DP-SGD's unit of privacy (fl_client.train.ByPatient)
    # FedProx's term: the round's μ (Flower's FedProx sends it), else the run's in a FedProx run. The learning rate
    # is the run's, resolved as the server resolved and stored it (for its report and a resume), even where this
    # site's own policy turns DP-SGD on in a run without it.
    spec = replace(config.training, proximal_mu=proximal_mu or proximal_mu_of(config),
                   learning_rate=resolve_learning_rate(config.training.learning_rate, segmentation=data.segmentation,
                                                       dp=config.privacy.enabled, task=config.model.task))
    ledger = PrivacyLedger(site.workspace)
    budget = ledger.budget()
    dp = None
    if config.privacy.enabled or (budget is not None and budget.require_dp):
        if config.model.norm == Norm.BATCH:  # a run under DP never has it (from_flat): the site's policy turned DP on
            return refusal(site, task=config.model.task, run_id=run_id, round_number=round_number, kind="train",
                           code=Refusal.NETWORK, detail="this site trains only under DP-SGD, which cannot train the "
                                                        "run's BatchNorm network; the lead can run it with dp=true "
                                                        "or norm=instance")
        # The site's own policy can require DP; the run's dp-epsilon is the target for this run, capped
        # by what the site has left (runs before this one count against the same ceiling).
        privacy = config.privacy
        if budget is not None:
            left = budget.epsilon_max - ledger.spent_outside(run_id, budget.delta)
            if left <= 0:
                return _refuse_budget(site, run_id, round_number, ledger, budget, strings)
            privacy = replace(privacy, enabled=True,
                              epsilon=min(privacy.epsilon, left, epsilon_cap if epsilon_cap is not None else left))
        try:
            dp = plan_dp(privacy, samples=patients, batch_size=resolve_batch(spec.batch_size, dp=True),
                         steps_per_round=steps_per_round(config, patients), rounds=config.federation.num_rounds,
                         ledger=ledger, grad_sample_mode=resolved_grad_sample_mode(config))
        except NoBudget:
            return _refuse_budget(site, run_id, round_number, ledger, budget, strings)
        if round_number <= 1 and (outlook := dp_outlook(dp.noise_multiplier, dp.sample_rate * patients)):
            log.warning("oncofed site %s, run %s: %s", site.site_id, run_id, outlook)
    global_params = {k: v.detach().clone() for k, v in model.named_parameters()} if spec.proximal_mu else None
    placement = site.placement(dp_mode=dp.grad_sample_mode.value if dp is not None else None)
    try:
        augmented = data.dataset("train", train=spec.augment, seed=spec.seed + 7919 * round_number)
        result = train_local(model, augmented, spec=spec, labels=data.labels("train"),
                             global_params=global_params, dp=dp, ledger=ledger, run_id=run_id,
                             round_number=round_number, task=config.model.task, placement=placement,
                             segmentation=data.segmentation, patients=data.patients("train"))
    except BudgetExceeded:
        return _refuse_budget(site, run_id, round_number, ledger, budget, strings)
    metrics: dict[str, float] = {Metric.NUM_EXAMPLES: result.num_examples, Metric.TRAIN_LOSS: result.loss,
                                 Metric.TRAIN_SECONDS: result.seconds, Metric.STEPS: result.steps,
                                 Metric.SAMPLES_SEEN: result.samples_seen, Metric.DP: int(dp is not None)}
    if dp is not None and budget is not None:  # DP ran, so the site has a budget (plan_dp requires one)
        metrics.update({Metric.EPSILON: float(result.epsilon or 0.0), Metric.EPSILON_MAX: budget.epsilon_max,
                        Metric.DELTA: budget.delta, Metric.NOISE_MULTIPLIER: dp.noise_multiplier,
                        Metric.SAMPLE_RATE: dp.sample_rate})
    reply = Reply(arrays={WEIGHTS: pack(state_arrays(model))}, metrics=metrics, strings=strings)
    return _send(site, run_id=run_id, round_number=round_number, kind="train", reply=reply, reference=reference)


def _refuse_budget(site: Site, run_id: str, round_number: int, ledger: PrivacyLedger, budget: Budget | None,
                   strings: dict[str, str]) -> Reply:
    metrics: dict[str, float] = {Metric.REFUSED: 1, Metric.REFUSED_BUDGET: 1, Metric.NUM_EXAMPLES: 0,
                                 Metric.EPSILON: ledger.spent(budget.delta) if budget else 0.0}
    # No epsilon-max in the reply means the site has set no budget at all.
    if budget is not None:
        metrics.update({Metric.EPSILON_MAX: budget.epsilon_max, Metric.DELTA: budget.delta})
    why = "privacy budget spent" if budget is not None else "DP asked for but the site has set no privacy budget"
    reply = Reply(metrics=metrics, strings={**strings, SiteKey.REFUSAL: Refusal.BUDGET, SiteKey.DETAIL: why})
    return _send(site, run_id=run_id, round_number=round_number, kind="train-refused", reply=reply, reference=None)


def evaluate(site: Site, config: RunConfig, *, run_id: str, round_number: int, global_flat: np.ndarray,
             split: str = Split.VAL, evaluate_split: str | None = None) -> Reply:
    """Evaluate the global model on one split of the site's data (study-level metrics and counts), and on
    ``evaluate_split`` too if given (``Reply.evaluation``), with one model and one look at the catalog."""
    model, _ = _model_from(config, global_flat)
    data = _site_data(site, config)
    reply = _evaluate(site, config, model, data, run_id=run_id, round_number=round_number, split=split)
    if evaluate_split:
        extra = _evaluate(site, config, model, data, run_id=run_id, round_number=round_number, split=evaluate_split)
        reply = replace(reply, evaluation=extra.metrics)
    return reply


def _evaluate(site: Site, config: RunConfig, model: torch.nn.Module, data: SiteData | None, *, run_id: str,
              round_number: int, split: str) -> Reply:
    strings = {SiteKey.SITE_ID: site.site_id, SiteKey.TASK: config.model.task, SiteKey.SPLIT: split}
    result = evaluate_local(model, data, split, placement=site.placement()) if data is not None else None
    if result is None:
        reply = Reply(metrics={Metric.STUDIES: 0, Metric.NUM_EXAMPLES: 0}, strings=strings)
    else:
        m = result.metrics
        metrics: dict[str, float] = {Metric.STUDIES: m.studies, Metric.POSITIVES: m.positives,
                                     Metric.NEGATIVES: m.negatives, Metric.THRESHOLD: m.threshold,
                                     Metric.NUM_EXAMPLES: m.studies, Metric.EVAL_SECONDS: result.seconds}
        figures: tuple[tuple[Metric, float | int | None], ...]
        if isinstance(m, SegMetrics):
            figures = ((Metric.DICE, m.dice), (Metric.LESIONS, m.lesions),
                       (Metric.LESION_SENSITIVITY, m.lesion_sensitivity), (Metric.FP_LESIONS, m.fp_lesions),
                       (Metric.HD95, m.hd95), (Metric.EVAL_LOSS, m.loss))
        else:
            figures = ((Metric.AUROC, m.auroc), (Metric.AUROC_LOW, m.auroc_low), (Metric.AUROC_HIGH, m.auroc_high),
                       (Metric.ECE, m.ece), (Metric.SENSITIVITY, m.sensitivity),
                       (Metric.SPECIFICITY, m.specificity), (Metric.BALANCED_ACCURACY, m.balanced_accuracy),
                       (Metric.BRIER, m.brier), (Metric.EVAL_LOSS, m.loss))
            min_count = RunBook(site.workspace).policy().min_count
            if result.labels is not None and result.scores is not None:
                # The studies' scores leave only as per-class counts on fixed bins (for the consortium's AUROC), and
                # only when each class holds at least the site's minimum count: a histogram of two positives
                # places each of those patients' scores in a bin.
                if min(m.positives, m.negatives) >= min_count:
                    metrics.update(histogram_metrics(*score_histogram(result.labels, result.scores)))
                if split == Split.TEST and data is not None:  # figures per scanner vendor, slice band, field
                    groups = study_subgroups(data, split)
                    metrics.update(subgroup_metrics(subgroup_figures(groups, result.study_uids, result.labels,
                                                                     result.scores, min_count=min_count)))
        for key, value in figures:
            if value is not None:
                metrics[key] = float(value)
        reply = Reply(metrics=metrics, strings=strings)
    return _send(site, run_id=run_id, round_number=round_number, kind=f"evaluate-{split}", reply=reply,
                 reference=None)
