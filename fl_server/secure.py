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
import re
import time
from typing import Any

import numpy as np

from fl_server.runstore import RunStore
from fl_server.strategies import weighted_by_studies
from models.config import RunConfig, Strategy
from models.weights import unpack

log = logging.getLogger("flwr")
# The site's sentence ends where Flower's wrapping starts: "'>" (deployment), or an escaped newline of the
# traceback a simulation appends.
_REFUSAL = re.compile(r"site (\S+) does not train this round: ([^\\\n]+?)(?:'>|\\|\n|$)")


def run_secure(grid: Any, context: Any, *, config: RunConfig, store: RunStore, reference: dict[str, np.ndarray],
               initial: np.ndarray, flat_config: dict[str, Any], offset: int,
               on_round: Any = None) -> np.ndarray:
    """Run the remaining rounds with SecAgg+; return the final global weights (packed).

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
    final = {"weights": initial}
    started: dict[int, float] = {}

    def fit_config(rnd: int) -> dict[str, Any]:
        started[rnd + offset] = time.perf_counter()
        return {"server-round": rnd + offset, "run-id": run_id, "proximal-mu": config.training.proximal_mu}

    def eval_config(rnd: int) -> dict[str, Any]:
        return {"server-round": rnd + offset, "run-id": run_id, "split": "val"}

    class RecordingFedAvg(FedAvg):  # type: ignore[misc]
        """Flower's FedAvg; after each aggregation the round is recorded and checkpointed."""

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            rnd = server_round + offset
            record = store.round_record(rnd)
            for _, res in results:
                site = str(res.metrics.get("site-id", "?"))
                record["train"][site] = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)}
            for failure in failures:
                # A site that does not contribute raises "site X does not train this round: why" at the site.
                found = _REFUSAL.search(str(failure))
                entry = ({"site": found.group(1), "stage": "train", "reason": found.group(2).strip()} if found
                         else {"site": "?", "stage": "train", "reason": str(failure)[:200]})
                if entry not in record["failed"]:
                    record["failed"].append(entry)
            record["asked_train"] = len(results) + len(failures)
            record["aggregated_sites"] = len(results)
            record["secure_aggregation"] = True
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                # The protocol's sum comes back as float64: the global model stays float32 (the sites'
                # egress guard refuses to answer with another dtype than it received, and it should).
                flat = parameters_to_ndarrays(parameters)[0].astype(np.float32)
                parameters = ndarrays_to_parameters([flat])
                final["weights"] = flat
                store.checkpoint(rnd, unpack(flat, reference), flat_config)
                record["checkpoint"] = f"checkpoints/round-{rnd:03d}.pt"
            losses = [(res.num_examples, res.metrics.get("train-loss")) for _, res in results]
            losses = [(n, v) for n, v in losses if v is not None]
            if losses:
                record["aggregated_train"] = {"train-loss": sum(n * v for n, v in losses) / sum(n for n, _ in losses)}
            store.save()
            return parameters, metrics

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            rnd = server_round + offset
            record = store.round_record(rnd)
            for _, res in results:
                site = str(res.metrics.get("site-id", "?"))
                record["evaluate"][site] = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float)}
            aggregated = weighted_by_studies(record["evaluate"].values())
            if aggregated:
                record["aggregated_evaluate"] = aggregated
            wall = time.perf_counter() - started.get(rnd, time.perf_counter())
            work = [m.get("train-seconds", 0.0) for m in record["train"].values()]
            evals = [m.get("eval-seconds", 0.0) for m in record["evaluate"].values()]
            slowest = (max(work) if work else 0.0) + (max(evals) if evals else 0.0)
            record.update(seconds=wall, slowest_site_seconds=slowest,
                          overhead=(wall - slowest) / wall if wall else None)
            store.save()
            if on_round is not None:
                on_round(record)
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
    return np.asarray(final["weights"], dtype=np.float32)
