"""The consortium's Flower ServerApp: builds the global model, runs the composed strategy, checkpoints
every round, evaluates the final model on every site's test split, and writes the run report.

The server's own run-config keys (``run-dir``, ``resume``, ``update-norm-factor``, ``final-evaluation``,
``round-timeout``, ``evaluate-in-train``, secure aggregation's) are parsed and checked with the others
into :class:`models.config.ServerSpec`; defaults in ``pyproject.toml``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
log = logging.getLogger("flwr")


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def progress_line(record: dict[str, Any]) -> str:
    """One line per round for the live log: aggregated validation AUROC, per site, dropped and refused."""
    sites = " ".join(f"{s}={_fmt(m.get('auroc'), '.2f')}" for s, m in sorted(record["evaluate"].items()))
    eps = " ".join(f"{s}:ε={m['epsilon']:.2f}" for s, m in sorted(record["train"].items()) if m.get("epsilon"))
    parts = [f"round {record['round']:>3}", f"{record.get('seconds', 0):6.1f}s",
             f"train loss {_fmt(record['aggregated_train'].get('train-loss'))}",
             f"val AUROC {_fmt(record['aggregated_evaluate'].get('auroc'))} [{sites}]"]
    if eps:
        parts.append(eps)
    if record["dropped"]:
        parts.append("dropped " + ", ".join(f"{d['site']} ({d['reason']})" for d in record["dropped"]))
    if record["refused"]:
        parts.append("refused " + ", ".join(f"{d['site']} ({d['reason']})" for d in record["refused"]))
    if record["failed"]:
        parts.append("failed " + ", ".join(sorted({d["site"] for d in record["failed"]})))
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    from fl_server.grid import PromptGrid
    from fl_server.runstore import RunStore
    from fl_server.strategies import ConsortiumStrategy, build_strategy, packed_record
    from models.config import from_flat
    from models.nets import build_model
    from models.weights import pack, state_arrays, unpack

    grid = PromptGrid(grid)
    flat_config = dict(context.run_config)
    config = from_flat(flat_config)
    import torch

    torch.manual_seed(config.training.seed)
    reference = state_arrays(build_model(config.model))
    srv = config.server
    resume = srv.resume
    offset = 0
    if resume:
        store, arrays, offset = RunStore.resume(Path(resume))
        if store.config().get("task") != config.model.task:
            raise ValueError(f"cannot resume {resume}: it trains {store.config().get('task')}, "
                             f"this run config says {config.model.task}")
        if arrays is not None:
            from models.weights import check_arrays

            check_arrays(reference, arrays)  # the same network as the checkpoint's, or say which key differs
            initial = pack({k: arrays[k] for k in reference})
        else:
            initial = pack(reference)
        log.info("oncofed: resuming %s after round %d", store.root, offset)
    else:
        run_dir = srv.run_dir or f"~/oncofed-runs/run-{context.run_id}"
        store = RunStore.create(Path(run_dir), run_id=str(context.run_id), run_config=flat_config)
        initial = pack(reference)
        log.info("oncofed: run directory %s", store.root)
    remaining = config.federation.num_rounds - offset
    in_train = srv.evaluate_in_train
    strategy = ConsortiumStrategy(build_strategy(config), store=store, reference=reference,
                                  run_config=flat_config, round_offset=offset,
                                  norm_factor=srv.update_norm_factor,
                                  evaluate_in_train=in_train,
                                  on_round=lambda r: log.info("oncofed: %s", progress_line(r)))
    timeout = srv.round_timeout
    run_tag = ConfigRecord({"run-id": store.history["run_id"]})
    t0 = time.perf_counter()
    final_arrays = packed_record(initial)
    secure = srv.secure_aggregation
    if secure:
        in_train = False
        if remaining > 0:
            from fl_server.secure import run_secure

            flat = run_secure(grid, context, config=config, store=store, reference=reference, initial=initial,
                              flat_config=flat_config, offset=offset,
                              on_round=lambda r: log.info("oncofed: %s", progress_line(r)))
            final_arrays = packed_record(flat)
    elif remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=packed_record(initial), num_rounds=remaining,
                                timeout=timeout, train_config=ConfigRecord(dict(run_tag)),
                                evaluate_config=ConfigRecord(dict(run_tag)), evaluate_fn=strategy.end_of_round)
        final_arrays = result.arrays if result.arrays is not None and len(result.arrays) else final_arrays
    store.history["train_seconds"] = time.perf_counter() - t0
    if srv.final_evaluation or in_train:
        final, val = final_evaluation(grid, final_arrays, run_id=store.history["run_id"],
                                      round_number=config.federation.num_rounds, timeout=timeout, also_val=in_train)
        if in_train:  # the last model's validation figures come with the final evaluation
            strategy.record_evaluation(config.federation.num_rounds, val)
        if srv.final_evaluation:
            store.history["final"] = final
    store.history["finished"] = time.time()
    store.save()
    flat = final_arrays["weights"].numpy()
    from fl_server.runstore import save_model

    save_model(store.root / "model.pt", unpack(flat, reference), flat_config, config.federation.num_rounds)
    from fl_server.report import write_report

    page = write_report(store.root)
    log.info("oncofed: finished; global model %s, report %s", store.root / "model.pt", page)


def final_evaluation(grid: Grid, arrays: Any, *, run_id: str, round_number: int, timeout: float,
                     also_val: bool = False) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Evaluate the final global model on every connected site's test split (and validation split).

    Returns:
        The test-split document for the history, and each site's validation metrics (if asked).
    """
    from fl_server.strategies import refusal_of, registered_names, site_of, weighted_by_studies

    messages = []
    val: list[tuple[str, dict[str, float]]] = []
    for node_id in grid.get_node_ids():
        config: dict[str, Any] = {"split": "test", "run-id": run_id, "server-round": round_number}
        if also_val:
            config["evaluate-split"] = "val"
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
        messages.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.EVALUATE))
    per_site: dict[str, Any] = {}
    failed = []
    refused = []
    names = registered_names(grid)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failed.append({"site": site_of(reply, names, grid), "node": reply.metadata.src_node_id,
                           "reason": reply.error.reason})
            continue
        site = str(reply.content["site"].get("site-id")) if "site" in reply.content else str(reply.metadata.src_node_id)
        if (refusal := refusal_of(reply)) is not None:
            refused.append({"site": site, **refusal})
            continue
        per_site[site] = {k: float(v) for k, v in reply.content["metrics"].items()}  # type: ignore[arg-type]
        if "evaluation" in reply.content:
            val.append((site, {k: float(v) for k, v in reply.content["evaluation"].items()}))  # type: ignore
    pooled = weighted_by_studies(per_site.values())
    log.info("oncofed: final test evaluation: %s", {s: round(m.get("auroc", float("nan")), 3)
                                                     for s, m in per_site.items()})
    return {"split": "test", "sites": per_site, "weighted": pooled, "failed": failed, "refused": refused}, val
