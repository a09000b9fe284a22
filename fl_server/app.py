"""The consortium's Flower ServerApp: builds the global model, runs the composed strategy, checkpoints
every round, evaluates the final model on every site's test split, and writes the run report.

The server's own run-config keys (``run-dir``, ``resume``, ``initial-model``, ``update-norm-factor``,
``final-evaluation``, ``round-timeout``, ``evaluate-in-train``, secure aggregation's) are parsed and checked with
the others into :class:`models.config.ServerSpec`; defaults in ``pyproject.toml``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fl_server.evaluation import consortium_figures, too_small
from models.protocol import WEIGHTS, Metric, Record, RoundKey, SiteKey, Split, split_histograms, split_subgroups

__all__ = ["app", "check_resumed_federation", "cross_site", "data_summary", "final_evaluation", "main"]

app = ServerApp()
log = logging.getLogger("flwr")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    from dataclasses import replace

    from fl_server.grid import PromptGrid
    from fl_server.runstore import RunStore
    from fl_server.strategies import ConsortiumStrategy, build_strategy, packed_record
    from models.config import AVERAGING, Norm, RunKey, from_flat, resolve_learning_rate, resolve_norm, server_step
    from models.nets import build_model, set_trainable
    from models.tasks import is_segmentation
    from models.weights import pack, state_arrays, unpack

    grid = PromptGrid(grid)
    flat_config = dict(context.run_config)
    config = from_flat(flat_config)
    # Stored resolved: the report and a resume read them, and a later version's defaults must not change their meaning.
    flat_config[RunKey.NUM_ROUNDS] = config.federation.num_rounds
    flat_config[RunKey.SERVER_MOMENTUM] = config.federation.server_momentum
    flat_config[RunKey.SERVER_LEARNING_RATE] = config.federation.server_learning_rate  # the task's, for FedAvg/FedProx
    flat_config[RunKey.LEARNING_RATE] = resolve_learning_rate(config.training.learning_rate,
                                                              segmentation=is_segmentation(config.model.task),
                                                              dp=config.privacy.enabled, task=config.model.task)
    flat_config[RunKey.NORM] = config.model.norm.value  # the network a resume, export or explainer rebuilds
    flat_config[RunKey.PROXIMAL_MU] = config.training.proximal_mu
    flat_config[RunKey.STRATEGY] = config.federation.strategy.value  # fedavg where no norm layer dropped FedProx
    if str(context.run_config.get(RunKey.STRATEGY, "")) != config.federation.strategy.value:
        log.info("oncofed: strategy %s (asked: %s): %s", config.federation.strategy.value,
                 context.run_config.get(RunKey.STRATEGY), "the network has no normalisation layer, and FedProx's "
                 "term held such a network at chance; set proximal-mu to run FedProx anyway")
    asked = replace(config.model, norm=Norm(str(context.run_config.get(RunKey.NORM, "auto")).strip().lower()))
    if resolve_norm(asked, batch_ok=True) == Norm.BATCH != config.model.norm:  # auto, and this run cannot train it
        log.info("oncofed: norm %s (the task's is batch): this run cannot train BatchNorm (DP-SGD, secure "
                 "aggregation, or a server step other than the plain mean), so it trains InstanceNorm",
                 config.model.norm.value)
    import torch

    torch.manual_seed(config.training.seed)
    network = build_model(config.model)
    reference = state_arrays(network)
    trained = set(set_trainable(network, config.training.fine_tune))  # what the sites train (fine-tune)
    frozen = [name for name, _ in network.named_parameters() if name not in trained]
    srv = config.server
    resume = srv.resume
    offset = 0
    if resume:
        store, arrays, offset = RunStore.resume(Path(resume))
        if store.config().get(RunKey.TASK) != config.model.task:
            raise ValueError(f"cannot resume {resume}: it trains {store.config().get(RunKey.TASK)}, "
                             f"this run config says {config.model.task}")
        check_resumed_federation(store.config(), config, resume)
        if arrays is not None:
            from models.weights import check_arrays

            check_arrays(reference, arrays)  # the same network as the checkpoint's, or say which key differs
            initial = pack({k: arrays[k] for k in reference})
        elif store.history.get("initial_model"):  # stopped before its first checkpoint: the same start again
            from fl_server.initial import reload_initial

            initial = pack(reload_initial(store.history["initial_model"], config, reference).arrays)
        else:
            initial = pack(reference)
        log.info("oncofed: resuming %s after round %d", store.root, offset)
    else:
        run_dir = srv.run_dir or f"~/oncofed-runs/run-{context.run_id}"
        start = None
        if srv.initial_model:
            from fl_server.initial import load_initial

            start = load_initial(srv.initial_model, config, reference)  # checked before the run directory exists
        store = RunStore.create(Path(run_dir), run_id=str(context.run_id), run_config=flat_config,
                                initial_model=None if start is None else start.record())
        initial = pack(reference if start is None else start.arrays)
        if start is not None:
            log.info("oncofed: starting from %s (sha256 %s)", start.path, start.sha256[:16])
            caution = start.caution(config.privacy.enabled)
            if caution:
                log.warning("oncofed: %s", caution)
        log.info("oncofed: run directory %s", store.root)
    if (srv.data_summary and offset == 0) or srv.summary_only:
        data_summary(grid, store, flat_config, need=config.federation.min_sites, timeout=srv.round_timeout)
        if srv.summary_only:
            store.history.update(summary_only=True, finished=time.time())
            store.save()
            log.info("oncofed: finished; data summary %s", store.root / "summary" / "summary.html")
            return
    remaining = config.federation.num_rounds - offset
    in_train = srv.evaluate_in_train
    strategy = ConsortiumStrategy(build_strategy(config), store=store, reference=reference,
                                  run_config=flat_config, round_offset=offset,
                                  norm_factor=srv.update_norm_factor,
                                  evaluate_in_train=in_train,
                                  on_round=lambda r: log.info("oncofed: %s", r.progress_line()),
                                  server_step=server_step(config.federation)
                                  if config.federation.strategy in AVERAGING else None,  # the others step themselves
                                  server_momentum=config.federation.server_momentum,
                                  kept=frozen)
    if offset:
        state = store.server_state(offset)
        if state is not None:
            strategy.restore_server_state(state)  # the momentum or moments the last checkpointed round left
        elif config.federation.server_momentum or config.federation.strategy not in AVERAGING:
            log.warning("oncofed: round %d's checkpoint has no server optimiser state (no update aggregated yet, or "
                        "a run of an earlier version): the server's momentum starts from zero", offset)
        store.history["resumed_at"][-1]["server_state"] = state is not None
        store.save()
    timeout = srv.round_timeout
    run_tag = ConfigRecord({RoundKey.RUN_ID: store.history["run_id"]})
    t0 = time.perf_counter()
    final_arrays = packed_record(initial)
    secure = srv.secure_aggregation
    if secure:
        in_train = False
        if remaining > 0:
            from fl_server.secure import run_secure

            flat = run_secure(grid, context, config=config, store=store, reference=reference, initial=initial,
                              flat_config=flat_config, offset=offset, kept=strategy.kept_mask,
                              on_round=lambda r: log.info("oncofed: %s", r.progress_line()))
            final_arrays = packed_record(flat)
    elif remaining > 0:
        result = strategy.start(grid=grid, initial_arrays=packed_record(initial), num_rounds=remaining,
                                timeout=timeout, train_config=ConfigRecord(dict(run_tag)),
                                evaluate_config=ConfigRecord(dict(run_tag)), evaluate_fn=strategy.end_of_round)
        final_arrays = result.arrays if result.arrays is not None and len(result.arrays) else final_arrays
    store.history["train_seconds"] = time.perf_counter() - t0
    figures = None  # the consortium's figures of this invocation's final model (never a resumed run's earlier ones)
    if remaining > 0:  # a resumed run trained on: no figures of the earlier model stay that are not computed again
        if not srv.final_evaluation:
            store.history.pop("final", None)
        if not srv.cross_site_eval:
            store.history.pop("cross_site", None)
    if srv.final_evaluation or in_train or srv.cross_site_eval:
        final, val = final_evaluation(grid, final_arrays, run_id=store.history["run_id"],
                                      round_number=config.federation.num_rounds, timeout=timeout, also_val=True,
                                      operating_point=config.federation.operating_point)
        figures = final.get("consortium")
        if in_train:  # the last model's validation figures come with the final evaluation
            strategy.record_evaluation(config.federation.num_rounds, val)
        if srv.final_evaluation:
            store.history["final"] = final
        if srv.cross_site_eval:
            store.history["cross_site"] = cross_site(grid, final, strategy.local_models, secure=secure,
                                                     run_id=store.history["run_id"],
                                                     round_number=config.federation.num_rounds, timeout=timeout)
    store.history["finished"] = time.time()
    store.save()
    flat = final_arrays[WEIGHTS].numpy()
    from fl_server.evaluation import scoring_of
    from models.weights import save_checkpoint

    # The global model carries the consortium's calibration and operating point (chosen on validation above, for
    # these weights), so that a site reads its scores as the report does.
    scoring = scoring_of(figures)
    if figures is None and remaining <= 0 and (store.root / "model.pt").is_file():
        from models.weights import load_scoring

        scoring = load_scoring(store.root / "model.pt")  # the same weights, evaluated before: keep what they carry
    save_checkpoint(store.root / "model.pt", unpack(flat, reference), flat_config,
                    round_number=config.federation.num_rounds, scoring=scoring)
    from fl_server.report import write_report

    page = write_report(store.root)
    log.info("oncofed: finished; global model %s, report %s", store.root / "model.pt", page)


def check_resumed_federation(stored: dict[str, Any], config: Any, run_dir: str) -> None:
    """Refuse to resume a run under another network, aggregation or local step than it was started with: its
    checkpoints hold that network's weights, the server's momentum or moments belong to that strategy and step, and
    the sites' rate is part of the run. A run stored before ``server-momentum`` existed ran without momentum; one
    stored without its ``norm`` ran InstanceNorm.

    Raises:
        ValueError: The norm, strategy, server learning rate, server momentum, learning rate or fine-tuning scope
            differ; the message names the key.
    """
    from models.config import KEYS, RunKey, from_flat, resolve_learning_rate, server_step, stored_server_step
    from models.tasks import is_segmentation

    # Defaults of the versions that stored no such key: no momentum, and InstanceNorm (the default before 0.3.2).
    known = {RunKey.SERVER_MOMENTUM: 0.0, RunKey.NORM: "instance",
             **{k: v for k, v in stored.items() if k in KEYS and k != RunKey.RESUME}}
    known[RunKey.SERVER_LEARNING_RATE] = stored_server_step(known)  # stored unresolved before 0.3.5: the mean itself
    then = from_flat(known)
    before, now = then.federation, config.federation
    segmentation = is_segmentation(config.model.task)
    for key, old, new in ((RunKey.NORM, then.model.norm.value, config.model.norm.value),
                          (RunKey.STRATEGY, before.strategy.value, now.strategy.value),
                          (RunKey.SERVER_LEARNING_RATE, server_step(before), server_step(now)),
                          (RunKey.SERVER_MOMENTUM, before.server_momentum, now.server_momentum),
                          (RunKey.LEARNING_RATE,
                           resolve_learning_rate(then.training.learning_rate, segmentation=segmentation,
                                                 dp=then.privacy.enabled, task=then.model.task),
                           resolve_learning_rate(config.training.learning_rate, segmentation=segmentation,
                                                 dp=config.privacy.enabled, task=config.model.task)),
                          (RunKey.FINE_TUNE, then.training.fine_tune.value, config.training.fine_tune.value)):
        if old != new:
            raise ValueError(f"cannot resume {run_dir}: it ran with {key}={old}, this run config says {new}; "
                             f"resume with --set {key}={old} (the server's saved state belongs to it)")


def data_summary(grid: Grid, store: Any, flat_config: dict[str, Any], *, need: int, timeout: float) -> None:
    """Ask every site for its data summary (once ``need`` sites are connected, or after ``timeout``) and keep it in
    ``RUN_DIR/summary/``; its warnings go to the log."""
    from fl_server.summary import build_summary, query_sites, write_summary

    end = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < need and time.monotonic() < end:
        time.sleep(0.5)
    doc = build_summary(query_sites(grid, run_id=str(store.history["run_id"]), timeout=timeout),
                        run_config=flat_config)
    page = write_summary(store.root, doc)
    shared = sum(1 for task in doc["tasks"].values() for _ in task["sites"]) // max(1, len(doc["tasks"]))
    log.info("oncofed: data summary of %d site(s) (%d refused, %d failed): %s", shared, len(doc["refused"]),
             len(doc["failed"]), page)
    for warning in doc["warnings"]:
        log.warning("oncofed: data summary: %s", warning)


def cross_site(grid: Grid, final: dict[str, Any], local_models: dict[str, Any], *, secure: bool, run_id: str,
               round_number: int, timeout: float) -> dict[str, Any]:
    """The cross-site matrix: the global model (from the final evaluation) and each site's last local model,
    each evaluated by every site on its test split. Under secure aggregation the server never saw a local model:
    only the global row.

    Returns:
        ``{"models": {"global" | "site X": {evaluating site: metrics}}, "refused": [...], "failed": [...],
        "note": ...}``.
    """
    models: dict[str, Any] = {"global": final.get("sites", {})}
    refused, failed = list(final.get("refused", [])), list(final.get("failed", []))
    for site, arrays in sorted(local_models.items()):
        doc, _ = final_evaluation(grid, arrays, run_id=run_id, round_number=round_number, timeout=timeout)
        models[f"site {site}"] = doc["sites"]
        refused += [{**e, "model": f"site {site}"} for e in doc["refused"]]
        failed += [{**e, "model": f"site {site}"} for e in doc["failed"]]
    note = ("secure aggregation: the server never saw a site's local model, so only the global model is evaluated"
            if secure else "each local model is the site's last accepted update")
    log.info("oncofed: cross-site evaluation of %d model(s)", len(models))
    return {"split": "test", "models": models, "refused": refused, "failed": failed, "note": note}


def final_evaluation(grid: Grid, arrays: Any, *, run_id: str, round_number: int, timeout: float,
                     also_val: bool = False, operating_point: str = ""
                     ) -> tuple[dict[str, Any], list[tuple[str, dict[str, float]]]]:
    """Evaluate the final global model on every connected site's test split (and validation split).

    With ``operating_point`` (the run's rule) and the validation split asked too, the document also holds the
    consortium's figures from the sites' score histograms (:func:`fl_server.evaluation.consortium_figures`):
    AUROC with its interval, the threshold the rule picks on the pooled validation scores and the test rates at
    it, calibration and ROC curves.

    Returns:
        The test-split document for the history, and each site's validation metrics (if asked).
    """
    from fl_server.rounds import weighted_by_studies
    from fl_server.strategies import refusal_of, registered_names, site_of

    messages = []
    val: list[tuple[str, dict[str, float]]] = []
    for node_id in grid.get_node_ids():
        config: dict[str, Any] = {RoundKey.SPLIT: Split.TEST, RoundKey.RUN_ID: run_id,
                                  RoundKey.SERVER_ROUND: round_number}
        if also_val:
            config[RoundKey.EVALUATE_SPLIT] = Split.VAL
        content = RecordDict({Record.ARRAYS: arrays, Record.CONFIG: ConfigRecord(config)})
        messages.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.EVALUATE))
    per_site: dict[str, Any] = {}
    test_hists: dict[str, dict[str, list[float]]] = {}
    subgroups: dict[str, dict[str, dict[str, float]]] = {}
    val_hists: dict[str, dict[str, list[float]]] = {}
    failed = []
    refused = []
    names = registered_names(grid)
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            failed.append({"site": site_of(reply, names, grid), "node": reply.metadata.src_node_id,
                           "reason": reply.error.reason})
            continue
        site = (str(reply.content[Record.SITE].get(SiteKey.SITE_ID)) if Record.SITE in reply.content
                else str(reply.metadata.src_node_id))
        if (refusal := refusal_of(reply)) is not None:
            refused.append({"site": site, **refusal})
            continue
        metrics, pos, neg = split_histograms(reply.content[Record.METRICS])  # type: ignore[arg-type]
        metrics, groups = split_subgroups(metrics)
        per_site[site] = metrics
        if groups:
            subgroups[site] = groups
        if pos is not None and neg is not None:
            test_hists[site] = {"pos": pos, "neg": neg}
        if Record.EVALUATION in reply.content:
            extra = {k: float(v) for k, v in reply.content[Record.EVALUATION].items()}  # type: ignore[arg-type]
            val.append((site, extra))
            _, vpos, vneg = split_histograms(extra)
            if vpos is not None and vneg is not None:
                val_hists[site] = {"pos": vpos, "neg": vneg}
    pooled = weighted_by_studies(per_site.values())
    head = Metric.DICE if any(Metric.DICE in m for m in per_site.values()) else Metric.AUROC
    log.info("oncofed: final test evaluation (%s): %s", head, {s: round(m.get(head, float("nan")), 3)
                                                              for s, m in per_site.items()})
    doc: dict[str, Any] = {"split": Split.TEST.value, "sites": per_site, "weighted": pooled, "failed": failed,
                           "refused": refused, "subgroups": subgroups}
    # Classifier sites that scored test studies but sent no histogram: a class below the site's minimum count.
    doc["without_histograms"] = sorted(s for s, m in per_site.items() if m.get(Metric.STUDIES, 0) > 0
                                       and Metric.DICE not in m and s not in test_hists)
    if operating_point and test_hists:
        doc["consortium"] = consortium_figures(test_hists, val_hists, rule=operating_point)
        doc["histograms"] = test_hists
        doc["too_small"] = sorted(site for site, m in per_site.items() if too_small(m))
        auc = (doc["consortium"] or {}).get("auroc")
        if auc:
            log.info("oncofed: consortium test AUROC %.3f (95 %% CI %.3f-%.3f, %d+/%d-, binning error <= %.3f); "
                     "operating point %s", auc["auroc"], auc["low"], auc["high"], auc["positives"], auc["negatives"],
                     auc["max_error"], doc["consortium"]["operating_point"]["threshold"])
    return doc, val
