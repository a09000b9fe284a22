"""Flower's own strategies, composed with what a consortium needs around them.

:func:`build_strategy` picks the stock Flower strategy for the run (FedAvg, FedProx, FedAdam, FedYogi,
FedMedian, FedTrimmedAvg). :class:`ConsortiumStrategy` wraps it: it is a Flower ``Strategy`` whose
``configure_*`` and ``aggregate_*`` delegate to the inner one, and it adds, around those calls only,

- update validation before aggregation (keys, shapes, dtypes, finite values, norm outliers): a bad
  reply is dropped with the site named, and the round goes on with the rest;
- refusals (privacy budget spent, no data) counted per site, not aggregated;
- per-site training and evaluation metrics, timings and framework overhead per round;
- round numbers continued after a resume, and a checkpoint after every round;
- for the averaging strategies, the server's step along the round's aggregated update
  (:func:`models.config.server_step`: the task's, 1 (the aggregate itself) but for breast MG's 2
  (:data:`models.tasks.TASK_SERVER_STEP`), unless the run sets ``server-learning-rate``),
  with server momentum when the run sets ``server-momentum`` (FedAvgM: :class:`ServerStep`);
- the server's optimiser state (the momentum, FedAdam's and FedYogi's moments) saved with every round's
  checkpoint and restored on resume, so a resumed run steps as an uninterrupted one.

The round loop itself is Flower's ``Strategy.start``; nothing here re-implements it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fl_server.rounds import RoundRecord, RoundRecorder, warned_sites
from fl_server.runstore import RunStore
from fl_server.validation import screen_updates
from models.config import RunConfig, RunKey, Strategy, proximal_mu_of, server_step
from models.protocol import (
    EVAL_AGGREGATED,
    HEADLINE_METRICS,
    TRAIN_AGGREGATED,
    WEIGHTS,
    Metric,
    Record,
    RoundKey,
    SiteKey,
    Split,
    parse_failure,
)

__all__ = ["RECIPES", "ConsortiumStrategy", "ServerStep", "build_strategy", "keep_frozen", "packed_record",
           "refusal_of", "registered_names", "site_of", "stepped", "stepped_array"]

log = logging.getLogger("oncofed.server")

_S, _MU, _STEP, _M = RunKey.STRATEGY, RunKey.PROXIMAL_MU, RunKey.SERVER_LEARNING_RATE, RunKey.SERVER_MOMENTUM
RECIPES: MappingProxyType[str, dict[str, Any]] = MappingProxyType({
    "default": {},
    "fedavg": {_S: "fedavg", _M: 0.0},
    "fedavg-step3": {_S: "fedavg", _STEP: 3.0, _M: 0.0},
    "fedprox": {_S: "fedprox", _MU: 0.01, _M: 0.0},
    "norm-instance": {RunKey.NORM: "instance"},
    "norm-none": {RunKey.NORM: "none"},
    "fedavgm": {_S: "fedavg", _M: 0.9},
    "fedprox-momentum": {_S: "fedprox", _MU: 0.01, _M: 0.9},
    "fedprox-momentum0.5": {_S: "fedprox", _MU: 0.01, _M: 0.5},
    "fedadam": {_S: "fedadam"},
})
"""Named federated recipes as run-config values, the ones the benchmarks compare: "default" is the run config's
own defaults as each task resolves them (BatchNorm for the colorectal CT classifier, where the recipe can train it:
FedAvg and FedProx at step 1; breast MG at step 2; the stepped, momentum and adaptive recipes train InstanceNorm);
"norm-instance" and "norm-none" give it InstanceNorm or no normalisation (and a FedAvg run); the plain recipes pin
``server-momentum`` to 0 (a segmentation task's default would add it); "fedavg-step3" steps three times along the
mean update (with three sites, about as far as a pooled epoch); "fedavgm" is Flower's FedAvgM at β 0.9."""


def build_strategy(config: RunConfig, *, sites: int | None = None) -> FlowerStrategy:
    """The stock Flower strategy for ``config.federation.strategy``.

    Args:
        config: The run configuration.
        sites: Sites to wait for before a round (default: the run's ``min-sites``).
    """
    f = config.federation
    need = sites or f.min_sites
    common: dict[str, Any] = dict(fraction_train=f.fraction_train, fraction_evaluate=f.fraction_evaluate,
                                  min_train_nodes=min(need, f.min_sites), min_evaluate_nodes=min(need, f.min_sites),
                                  min_available_nodes=need)
    if f.strategy == Strategy.FEDAVG:
        return FedAvg(**common)
    if f.strategy == Strategy.FEDPROX:
        return FedProx(proximal_mu=proximal_mu_of(config), **common)
    if f.strategy == Strategy.FEDADAM:
        return FedAdam(eta=server_step(f), **common)
    if f.strategy == Strategy.FEDYOGI:
        return FedYogi(eta=server_step(f), **common)
    if f.strategy == Strategy.FEDMEDIAN:
        return FedMedian(**common)
    if f.strategy == Strategy.FEDTRIMMEDAVG:
        return FedTrimmedAvg(beta=f.trim_beta, **common)
    raise ValueError(f"no Flower strategy for {f.strategy!r}")


def site_of(msg: Message, names: dict[int, str] | None = None, grid: Grid | None = None) -> str:
    """The site id a reply carries; for an error reply, the id its reason names (the site's executor writes
    ``oncofed site ID: code: ...``), or the id its node gave before or was registered with, or its node id.
    ``grid`` (a :class:`fl_server.grid.PromptGrid`) tells which node an error the SuperLink wrote is about."""
    node_of = getattr(grid, "node_of", None)
    node = node_of(msg) if callable(node_of) else msg.metadata.src_node_id
    site = None
    if msg.has_content() and Record.SITE in msg.content:
        site = msg.content[Record.SITE].get(SiteKey.SITE_ID)
    elif msg.has_error() and (found := parse_failure(msg.error.reason or "")) is not None:
        site = found.site_id
    if site:
        if names is not None:
            names[node] = str(site)
        return str(site)
    return (names or {}).get(node, f"node-{node}")


def registered_names(grid: Grid) -> dict[int, str]:
    """Node id -> site id for the SuperNodes the lead registered as ``site-<id>`` (a deployment; empty in a
    simulation), so that a site that dies before it ever replied is still named by its site id."""
    try:
        nodes = list(grid.get_nodes())
    except Exception:  # noqa: BLE001 - a grid that cannot list its nodes: names come from the replies
        return {}
    names = {int(n.node_id): str(getattr(n, "name", "")) for n in nodes}
    return {node: name.removeprefix("site-") for node, name in names.items() if name.startswith("site-")}


def _metrics(msg: Message, key: str = Record.METRICS) -> dict[str, float]:
    if not msg.has_content() or key not in msg.content:
        return {}
    return {k: float(v) for k, v in msg.content[key].items() if isinstance(v, int | float)}


def refusal_of(msg: Message) -> dict[str, str] | None:
    """A site's refusal (its reason code and sentence), or None if the reply is not one."""
    if not _metrics(msg).get(Metric.REFUSED):
        return None
    strings: Any = msg.content.get(Record.SITE, {})
    code, detail = str(strings.get(SiteKey.REFUSAL, "")), str(strings.get(SiteKey.DETAIL, ""))
    if not detail:  # a site of an earlier version: the reason from its flags
        metrics = _metrics(msg)
        detail = ("no training data for the task" if metrics.get(Metric.REFUSED_NO_DATA)
                  else "privacy budget spent" if Metric.EPSILON_MAX in metrics
                  else "DP asked for but the site has set no privacy budget")
    return {"code": code, "reason": detail}


def keep_frozen(new: np.ndarray, sent: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The packed global model ``new`` with the values under ``mask`` (the weights a ``fine-tune`` run does not
    train) as they were ``sent``, in float32; ``new`` itself when there is no mask."""
    if mask is None:
        return new
    out = np.array(new, dtype=np.float32)
    out[mask] = np.asarray(sent, dtype=np.float32)[mask]
    return out


def _plain(arrays: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in arrays.items()}


def _normalised(msg: Message, keys: Iterable[str], *, with_arrays: bool) -> Message:
    """A copy of a reply with only what aggregation reads (Flower checks replies have equal keys)."""
    metrics = _metrics(msg)
    content = RecordDict({Record.METRICS: MetricRecord({Metric.NUM_EXAMPLES: metrics.get(Metric.NUM_EXAMPLES, 0.0),
                                                         **{k: metrics[k] for k in keys}})})
    if with_arrays:
        content[Record.ARRAYS] = msg.content[Record.ARRAYS]
    return Message(content=content, dst_node_id=msg.metadata.src_node_id, message_type=msg.metadata.message_type)


class ConsortiumStrategy(FlowerStrategy):
    """A Flower strategy wrapped with validation, bookkeeping and checkpoints.

    Args:
        inner: The stock Flower strategy that samples sites and aggregates.
        store: The run directory.
        reference: The global model's named arrays (its state dict): checkpoints are written with these
            names, shapes and dtypes, in the ``model.pt`` format every oncofed command reads.
        run_config: Flat run configuration, stored with every checkpoint.
        round_offset: Rounds already done before this process (when resuming).
        norm_factor: Update-norm outlier limit (see :func:`fl_server.validation.screen_updates`).
        evaluate_in_train: Each site evaluates the global model it receives on its validation split in
            the training message of the next round (and the last model in the final evaluation)
            instead of in a message of its own. Same figures, half the messages: in a deployment
            every message starts a new ClientApp process (about 5 s of imports on a small CPU).
        on_round: Called with a round's history record once it is complete (progress display).
        server_step: For the averaging strategies, the server's step on the round's aggregate
            (:func:`models.config.server_step`); without momentum the new global model is
            ``sent + step × (aggregate − sent)``. None for a strategy that steps by itself (FedAdam, FedYogi).
        server_momentum: For the averaging strategies, the momentum β of that step: the step then goes along the
            velocity ``v = β v + (aggregate − sent)`` (:class:`ServerStep`).
        kept: Names of ``reference`` arrays the run does not train (``fine-tune``: the convolutions): a site's update
            that changed them is dropped, and each new global model carries them as they were sent. The sites return
            them unchanged, but the mean of equal float32 values is not always bit-equal, and FedAdam's step moved
            them by that rounding every round.

    Raises:
        ValueError: A name in ``kept`` is not one of ``reference``'s.
    """

    def __init__(self, inner: FlowerStrategy, *, store: RunStore, reference: dict[str, np.ndarray],
                 run_config: dict[str, Any], round_offset: int = 0, norm_factor: float = 10.0,
                 evaluate_in_train: bool = False, on_round: Any = None,
                 server_step: float | None = None, server_momentum: float = 0.0,
                 kept: Iterable[str] = ()) -> None:
        self.inner = inner
        self.store = store
        self.reference = reference
        self.run_config = run_config
        self.offset = round_offset
        self.norm_factor = norm_factor
        self.evaluate_in_train = evaluate_in_train
        self.on_round = on_round
        self.server_step = server_step
        self.stepper = ServerStep(server_step, server_momentum) if server_step is not None else None
        kept = set(kept)
        if kept - set(reference):
            raise ValueError(f"frozen arrays {sorted(kept - set(reference))[:3]} are not the global model's")
        self.kept_mask = np.concatenate([np.full(int(np.prod(a.shape)), k in kept) for k, a in reference.items()]) \
            if kept and reference else None  # over the packed model (models.weights.pack)
        self._sent: dict[int, dict[str, np.ndarray]] = {}
        self._t0: dict[int, float] = {}
        self._names: dict[int, str] = {}  # node id -> site id, from the site's earlier replies
        self.local_models: dict[str, ArrayRecord] = {}  # site id -> its last accepted update (cross-site eval)
        self._grid: Grid | None = None
        # Sites warned of training under DP-SGD while the server uses momentum (a resumed run's history included).
        self._warned: set[str] = warned_sites(store.history)

    def summary(self) -> None:
        """Log how the run is set up (norm limit, where evaluation happens, rounds done before), then the
        stock strategy's summary."""
        log.info("oncofed: %s with update validation (norm limit %gx), evaluation %s, %d round(s) done before",
                 type(self.inner).__name__, self.norm_factor,
                 "inside the training messages" if self.evaluate_in_train else "in messages of its own", self.offset)
        self.inner.summary()

    # -- training ---------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's training messages, from the stock strategy (which samples the sites).

        Args:
            server_round: Flower's round number in this process; the run's round adds the rounds done before a
                resume.
            arrays: The global model to send.
            config: The round's configuration; it asks for the sites' validation metrics when they evaluate in
                the training messages.
            grid: Flower's grid.
        """
        rnd = server_round + self.offset
        self._t0[rnd] = time.perf_counter()
        self._sent[rnd] = _plain(arrays)
        self._names = {**registered_names(grid), **self._names}
        self._grid = grid
        if self.evaluate_in_train:
            config[RoundKey.EVALUATE_SPLIT] = Split.VAL
        messages = list(self.inner.configure_train(rnd, arrays, config, grid))
        RoundRecorder(self.store.round_record(rnd)).asked(len(messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record every site's training reply (failures and refusals included), drop malformed or outlying
        updates and aggregate the rest with the stock strategy.

        Args:
            server_round: Flower's round number in this process; the run's round adds the rounds done before a
                resume.
            replies: The sites' replies.

        Returns:
            The new global model and the aggregated training metrics, or ``(None, None)`` when no update was
            valid (the global model stays as it was).
        """
        rnd = server_round + self.offset
        recorder = RoundRecorder(self.store.round_record(rnd))
        sent = self._sent.get(rnd, {})
        candidates: list[Message] = []
        evaluations: list[tuple[str, dict[str, float]]] = []
        work = []
        for msg in replies:
            site = site_of(msg, self._names, self._grid)
            if msg.has_error():
                recorder.failed(site, msg.error.reason, stage="train")
                log.warning("round %d: site %s failed to train: %s", rnd, site, msg.error.reason)
                continue
            metrics = _metrics(msg)
            evaluation = _metrics(msg, Record.EVALUATION)
            if evaluation:
                evaluations.append((site, evaluation))
            work.append(metrics.get(Metric.TRAIN_SECONDS, 0.0) + evaluation.get(Metric.EVAL_SECONDS, 0.0))
            recorder.trained(site, metrics)
            if (refused := refusal_of(msg)) is not None:
                recorder.refused(site, refused, metrics=metrics)
                log.warning("round %d: site %s refused to train (%s)", rnd, site, refused["reason"])
                continue
            if Record.ARRAYS not in msg.content or Metric.NUM_EXAMPLES not in metrics:
                recorder.dropped(site, "reply without weights or num-examples")
                log.warning("round %d: dropped site %s: reply without weights or num-examples", rnd, site)
                continue
            candidates.append(msg)
        recorder.site_seconds(max(work) if work else 0.0)
        if evaluations:  # the model these sites received: the global model after the previous round
            self.record_evaluation(rnd - 1, evaluations)
        updates = [_plain(m.content[Record.ARRAYS]) for m in candidates]
        reasons, norms = screen_updates(sent, updates, norm_factor=self.norm_factor)
        if self.kept_mask is not None and WEIGHTS in sent:  # fine-tuning: the frozen arrays must come back as sent
            reasons = [reason if reason is not None or WEIGHTS not in update
                       or update[WEIGHTS].shape != sent[WEIGHTS].shape
                       or np.array_equal(update[WEIGHTS][self.kept_mask], sent[WEIGHTS][self.kept_mask])
                       else "changed weights this run does not train (fine-tune)"
                       for reason, update in zip(reasons, updates, strict=True)]
        kept = []
        for msg, reason, norm in zip(candidates, reasons, norms, strict=True):
            site = site_of(msg, self._names, self._grid)
            if norm is not None:
                recorder.update_norm(site, norm)
            if reason is not None:
                recorder.dropped(site, reason)
                log.warning("round %d: dropped the update of site %s: %s", rnd, site, reason)
            else:
                kept.append(msg)
                self.local_models[site] = msg.content[Record.ARRAYS]  # its last accepted update
        recorder.aggregated(len(kept))
        if not kept:
            log.warning("round %d: no valid update; the global model stays as it was", rnd)
            self.store.save()
            return None, None
        common = set.intersection(*(set(_metrics(m)) for m in kept))
        keys = [k for k in TRAIN_AGGREGATED if k in common]
        arrays, aggregated = self.inner.aggregate_train(rnd, [_normalised(m, keys, with_arrays=True) for m in kept])
        if arrays is not None and self.stepper is not None and sent:
            recorder.record["server_step"] = self.stepper.step
            if self.stepper.momentum:
                recorder.record["server_momentum"] = self.stepper.momentum
            if self.stepper.momentum or self.stepper.step > 1:
                dp_sites = [site_of(m, self._names, self._grid) for m in kept if _metrics(m).get(Metric.DP) == 1]
                for w in recorder.warn_momentum_under_dp(self.stepper.momentum, dp_sites, self._warned,
                                                         step=self.stepper.step):
                    log.warning("round %d: site %s: %s", rnd, w["site"], w["reason"])
            arrays = self.stepper.apply(sent, arrays)
        elif arrays is not None and sent:
            # FedAdam and FedYogi step with a float64 scalar, which NumPy 2 promotes the model to: sent as it is, the
            # float64 model would have every site's float32 update refused from round 2 on. Keep the sent dtypes.
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=sent[k].dtype))
                                  for k, v in _plain(arrays).items()})
        if arrays is not None and sent and self.kept_mask is not None and WEIGHTS in sent:
            arrays = packed_record(keep_frozen(_plain(arrays)[WEIGHTS], sent[WEIGHTS], self.kept_mask))
        recorder.aggregated(len(kept), {k: float(v) for k, v in (aggregated or {}).items()})  # type: ignore[arg-type]
        self.store.save()
        return arrays, aggregated

    # -- evaluation -------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The round's evaluation messages (on the sites' validation split); none when the sites evaluate in
        the training messages.

        Args:
            server_round: Flower's round number in this process; the run's round adds the rounds done before a
                resume.
            arrays: The global model to evaluate.
            config: The round's configuration.
            grid: Flower's grid.
        """
        if self.evaluate_in_train:
            return []
        rnd = server_round + self.offset
        config[RoundKey.SPLIT] = Split.VAL
        return self.inner.configure_evaluate(rnd, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the sites' evaluation replies (failures and refusals included) and aggregate their metrics.

        Args:
            server_round: Flower's round number in this process; the run's round adds the rounds done before a
                resume.
            replies: The sites' replies.

        Returns:
            The metrics weighted by studies, or None when no site sent any.
        """
        rnd = server_round + self.offset
        recorder = RoundRecorder(self.store.round_record(rnd))
        results = []
        for msg in replies:
            site = site_of(msg, self._names, self._grid)
            if msg.has_error():
                recorder.failed(site, msg.error.reason, stage="evaluate")
                continue
            if (refused := refusal_of(msg)) is not None:
                recorder.refused(site, refused, stage="evaluate")
                continue
            results.append((site, _metrics(msg)))
        return self.record_evaluation(rnd, results) if results else None

    def record_evaluation(self, rnd: int, results: list[tuple[str, dict[str, float]]]) -> MetricRecord | None:
        """Store the sites' validation metrics of the global model after round ``rnd`` and their
        weighted aggregate (Flower's own ``aggregate_evaluate``, weighted by studies)."""
        recorder = RoundRecorder(self.store.round_record(rnd))
        usable = []
        for site, metrics in results:
            recorder.evaluated(site, metrics)
            if metrics.get(Metric.STUDIES, 0) > 0 and any(k in metrics for k in HEADLINE_METRICS):
                usable.append(metrics)
        aggregated = None
        if usable:
            common = set.intersection(*(set(m) for m in usable))
            keys = [k for k in EVAL_AGGREGATED if k in common]
            aggregated = self.inner.aggregate_evaluate(rnd, [_metric_message(m, keys) for m in usable])
            recorder.aggregated_evaluation({k: float(v) for k, v in (aggregated or {}).items()})  # type: ignore
        self.store.save()
        if self.evaluate_in_train and rnd >= 1:
            self._emit(recorder.record)
        return aggregated

    # -- end of round (Flower calls this as evaluate_fn after each round, and with round 0) --------
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Checkpoint the round's global model and close its record."""
        rnd = server_round + self.offset
        if server_round == 0:
            return None
        recorder = RoundRecorder(self.store.round_record(rnd))
        recorder.site_seconds(recorder.record.get("site_seconds", 0.0))
        recorder.timed(time.perf_counter() - self._t0.get(rnd, time.perf_counter()),
                       separate_evaluation=not self.evaluate_in_train)
        from models.weights import unpack

        path = self.store.checkpoint(rnd, unpack(arrays[WEIGHTS].numpy(), self.reference), self.run_config,
                                     server_state=self.server_state())
        recorder.checkpointed(path.relative_to(self.store.root).as_posix())
        self.store.save()
        if not self.evaluate_in_train:
            self._emit(recorder.record)
        return None

    # -- the server optimiser's state, checkpointed with each round ---------------------------------
    def server_state(self) -> dict[str, np.ndarray]:
        """The state the next round's server step depends on besides the global model: the momentum of
        :class:`ServerStep`, and FedAdam's / FedYogi's first and second moments (Flower's ``m_t`` and ``v_t``);
        empty for a stateless step."""
        state = self.stepper.state() if self.stepper is not None else {}
        for name in ("m_t", "v_t"):
            moments = getattr(self.inner, name, None)
            if isinstance(moments, dict):
                state.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
        return state

    def restore_server_state(self, state: dict[str, np.ndarray]) -> None:
        """Take up :meth:`server_state` as a checkpoint saved it (on resume)."""
        if self.stepper is not None:
            self.stepper.load(state)
        for name in ("m_t", "v_t"):
            moments = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")}
            if moments and hasattr(self.inner, name):
                setattr(self.inner, name, moments)

    def _emit(self, record: dict[str, Any]) -> None:
        if self.on_round is not None:
            self.on_round(RoundRecord.from_dict(record))


def _metric_message(metrics: dict[str, float], keys: Iterable[str]) -> Message:
    content = RecordDict({Record.METRICS: MetricRecord({Metric.NUM_EXAMPLES: metrics.get(Metric.NUM_EXAMPLES, 0.0),
                                                         **{k: metrics[k] for k in keys}})})
    return Message(content=content, dst_node_id=0, message_type=MessageType.EVALUATE)


class ServerStep:
    """The server's step on a round's aggregate for the averaging strategies, with optional momentum (FedAvgM, Hsu
    et al. 2019, as Flower's ``FedAvgM`` computes it): ``v = β v + (aggregate − sent)``, new global model
    ``sent + step × v`` (``v`` starts at the first round's update). With β = 0 it is :func:`stepped`, and with
    step 1 as well the aggregate itself. The velocity is the state a resumed run needs (:meth:`state`).

    Args:
        step: The server learning rate (:func:`models.config.server_step`).
        momentum: β, in [0, 1).
    """

    def __init__(self, step: float, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum} (resolve the run config first)")
        self.step = step
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] | None = None

    def apply(self, sent: dict[str, np.ndarray], aggregated: ArrayRecord) -> ArrayRecord:
        """The new global model from the one sent and the round's aggregate, in the sent arrays' dtypes."""
        if not self.momentum:
            return stepped(sent, aggregated, self.step)
        return ArrayRecord({key: Array(value) for key, value in self.apply_arrays(sent, _plain(aggregated)).items()})

    def apply_arrays(self, sent: dict[str, np.ndarray], aggregated: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`apply` on plain arrays (also the secure-aggregation path's)."""
        if not self.momentum:
            return {k: stepped_array(sent[k], v, self.step, dtype=sent[k].dtype) for k, v in aggregated.items()}
        delta = {k: np.asarray(v, np.float64) - np.asarray(sent[k], np.float64) for k, v in aggregated.items()}
        if self.velocity is None:
            self.velocity = delta
        else:
            self.velocity = {k: self.momentum * self.velocity[k] + d for k, d in delta.items()}
        return {k: np.ascontiguousarray(np.asarray(sent[k], np.float64) + self.step * v, dtype=sent[k].dtype)
                for k, v in self.velocity.items()}

    def state(self) -> dict[str, np.ndarray]:
        """The velocity, keyed ``velocity/<array>`` (empty before the first round or without momentum)."""
        if not self.momentum:
            return {}
        return {f"velocity/{k}": v for k, v in (self.velocity or {}).items()}

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Take up a velocity :meth:`state` gave (nothing to take up without momentum)."""
        if not self.momentum:
            return
        velocity = {k.split("/", 1)[1]: np.asarray(v, np.float64) for k, v in state.items()
                    if k.startswith("velocity/")}
        self.velocity = velocity or None


def stepped(sent: dict[str, np.ndarray], aggregated: ArrayRecord, step: float) -> ArrayRecord:
    """``sent + step × (aggregated − sent)`` per array, computed in float64 and kept in the sent arrays' dtype
    (step 1: the aggregate itself)."""
    if step == 1.0:
        return aggregated
    return ArrayRecord({key: Array(stepped_array(sent[key], value, step, dtype=sent[key].dtype))
                        for key, value in _plain(aggregated).items()})


def stepped_array(before: np.ndarray, aggregate: np.ndarray, step: float, *, dtype: Any) -> np.ndarray:
    """``before + step × (aggregate − before)``, computed in float64, as a contiguous array of ``dtype``."""
    base = np.asarray(before, dtype=np.float64)
    return np.ascontiguousarray(base + step * (np.asarray(aggregate, dtype=np.float64) - base), dtype=dtype)


def packed_record(flat: np.ndarray) -> ArrayRecord:
    """The global model as Flower sends it: one flat float32 array."""
    return ArrayRecord({WEIGHTS: Array(np.ascontiguousarray(flat, dtype=np.float32))})
