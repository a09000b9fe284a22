"""Secure aggregation (SecAgg+): the server learns only the weighted sum of the sites' updates.

Flower 1.41 runs its SecAgg+ workflow only on its legacy API: a ``LegacyContext``, a legacy strategy and
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on the server, ``secaggplus_mod`` around a
handler that speaks the legacy ``FitIns``/``FitRes`` records on the site. This module is that server
side, called from our ServerApp when the run config says ``secure-aggregation=true``; the ClientApp
answers both kinds of message (see ``fl_client.app``).

What changes for the consortium under SecAgg+:

- the server cannot check single updates (it never sees one): update validation is off, and each site's
  values are clipped to ``±clipping_range`` before masking, which bounds what one site can do to the sum;
- only FedAvg and FedProx (a weighted mean is all the protocol computes);
- a site that drops out mid-round is handled by the protocol (Shamir shares) as long as
  ``reconstruction-threshold`` sites remain; a site that refuses to train counts as a drop-out.

Checkpoints, per-site metrics, the history and the report are the same as without it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fl_server.rounds import RoundRecord, RoundRecorder, warned_sites
from fl_server.runstore import RunStore
from fl_server.strategies import ServerStep, keep_frozen
from models.config import RunConfig, Strategy, proximal_mu_of, server_step
from models.protocol import Metric, RoundKey, SiteKey, Split, parse_failure
from models.weights import unpack

__all__ = ["failure_entry", "run_secure"]

log = logging.getLogger("flwr")


def failure_entry(failure: Any) -> tuple[str, str]:
    """``(site, reason)`` of a SecAgg+ failure: a site that does not contribute raises its refusal or failure in
    the one text form of :func:`models.protocol.failure_text`, which Flower wraps; anything else is unnamed."""
    parsed = parse_failure(str(failure))
    if parsed is None:
        return "?", str(failure)[:200]
    return parsed.site_id, parsed.sentence


def run_secure(grid: Any, context: Any, *, config: RunConfig, store: RunStore, reference: dict[str, np.ndarray],
               initial: np.ndarray, flat_config: dict[str, Any], offset: int,
               on_round: Any = None, kept: Any = None) -> np.ndarray:
    """Run the remaining rounds with SecAgg+; return the final global weights (packed). ``kept``: a mask over the
    packed model of the weights the run does not train (``fine-tune``); the protocol's quantised sum would move
    them a little every round, so each new global model carries them as they were sent.

    Raises:
        ValueError: A strategy SecAgg+ cannot run.
    """
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    f = config.federation
    if f.strategy not in (Strategy.FEDAVG, Strategy.FEDPROX):
        raise ValueError(f"secure-aggregation works with strategy fedavg or fedprox, not {f.strategy.value}: the "
                         "protocol reveals only a weighted sum")
    run_id = str(store.history["run_id"])
    final = {"flat": initial}
    # The step (and momentum) along the mean of the sum the protocol revealed: a function of the aggregate alone.
    stepper = ServerStep(server_step(f), f.server_momentum)
    if offset and (state := store.server_state(offset)) is not None:  # the app recorded whether there was one
        stepper.load(state)
    started: dict[int, float] = {}
    warned = warned_sites(store.history)  # sites warned of training under DP-SGD while the server uses momentum

    def fit_config(rnd: int) -> dict[str, Any]:
        started[rnd + offset] = time.perf_counter()
        return {RoundKey.SERVER_ROUND: rnd + offset, RoundKey.RUN_ID: run_id,
                RoundKey.PROXIMAL_MU: proximal_mu_of(config)}

    def eval_config(rnd: int) -> dict[str, Any]:
        return {RoundKey.SERVER_ROUND: rnd + offset, RoundKey.RUN_ID: run_id, RoundKey.SPLIT: Split.VAL}

    class RecordingFedAvg(FedAvg):  # type: ignore[misc]
        """Flower's FedAvg; after each aggregation the round is recorded and checkpointed."""

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            rnd = server_round + offset
            recorder = RoundRecorder(store.round_record(rnd))
            for _, res in results:
                recorder.trained(str(res.metrics.get(SiteKey.SITE_ID, "?")),
                                 {k: v for k, v in res.metrics.items() if isinstance(v, int | float)})
            for failure in failures:
                site, reason = failure_entry(failure)
                recorder.failed(site, reason, stage="train")
            recorder.asked(len(results) + len(failures))
            recorder.record["secure_aggregation"] = True
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                # The protocol's sum comes back as float64: the global model stays float32 (the sites'
                # egress guard refuses to answer with another dtype than it received, and it should).
                recorder.record["server_step"] = stepper.step
                if stepper.momentum:
                    recorder.record["server_momentum"] = stepper.momentum
                if stepper.momentum or stepper.step > 1:
                    dp_sites = [str(res.metrics.get(SiteKey.SITE_ID, "?")) for _, res in results
                                if res.metrics.get(Metric.DP) == 1]
                    for w in recorder.warn_momentum_under_dp(stepper.momentum, dp_sites, warned, step=stepper.step):
                        log.warning("round %d: site %s: %s", rnd, w["site"], w["reason"])
                flat = stepper.apply_arrays({"flat": np.asarray(final["flat"], dtype=np.float32)},
                                            {"flat": parameters_to_ndarrays(parameters)[0]})["flat"]
                flat = keep_frozen(flat, final["flat"], kept)
                parameters = ndarrays_to_parameters([flat])
                final["flat"] = flat
                path = store.checkpoint(rnd, unpack(flat, reference), flat_config, server_state=stepper.state())
                recorder.checkpointed(path.relative_to(store.root).as_posix())
            losses = [(res.num_examples, res.metrics.get(Metric.TRAIN_LOSS)) for _, res in results]
            losses = [(n, v) for n, v in losses if v is not None]
            recorder.aggregated(len(results), {Metric.TRAIN_LOSS: sum(n * v for n, v in losses) /
                                               sum(n for n, _ in losses)} if losses else None)
            store.save()
            return parameters, metrics

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            rnd = server_round + offset
            recorder = RoundRecorder(store.round_record(rnd))
            for _, res in results:
                recorder.evaluated(str(res.metrics.get(SiteKey.SITE_ID, "?")),
                                   {k: v for k, v in res.metrics.items() if isinstance(v, int | float)})
            recorder.aggregated_evaluation()
            recorder.timed(time.perf_counter() - started.get(rnd, time.perf_counter()), separate_evaluation=True)
            store.save()
            if on_round is not None:
                on_round(RoundRecord.from_dict(recorder.record))
            return super().aggregate_evaluate(server_round, results, failures)

    sites = f.min_sites
    strategy = RecordingFedAvg(
        fraction_fit=f.fraction_train, fraction_evaluate=f.fraction_evaluate, min_fit_clients=sites,
        min_evaluate_clients=sites, min_available_clients=sites, on_fit_config_fn=fit_config,
        on_evaluate_config_fn=eval_config, initial_parameters=ndarrays_to_parameters([initial]),
    )
    remaining = f.num_rounds - offset
    if sites < 3:
        raise ValueError("secure-aggregation needs min-sites of 3 or more: with two sites each could work out the "
                         "other's update from the sum")
    # Each site shares its mask keys with every site; any `threshold` of them can rebuild a drop-out's mask.
    threshold = config.server.reconstruction_threshold or sites - 1
    if not 2 <= threshold < sites:
        raise ValueError(f"reconstruction-threshold must be from 2 to {sites - 1} (min-sites - 1), got {threshold}")
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=sites, reconstruction_threshold=threshold, max_weight=100000.0,
        clipping_range=config.server.clipping_range, timeout=config.server.round_timeout))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining, round_timeout=None),
                           strategy=strategy)
    log.info("oncofed: secure aggregation (SecAgg+): %d shares, reconstruction threshold %d; the server sees "
             "only the sum of the updates", sites, threshold)
    workflow(grid, legacy)
    return np.asarray(final["flat"], dtype=np.float32)
