"""The site's Flower ClientApp: thin handlers around :mod:`fl_client.federated`.

Flower may start a fresh process for every message, so this module imports only Flower's records at
load time; torch, MONAI and the training code are imported inside the handlers.

Messages in (from the server): ``arrays`` (one packed float32 array ``weights``) and ``config``
(``server-round``, optional ``proximal-mu``, ``split`` for evaluation, ``evaluate-split`` to also
evaluate the received model on that split in the same message, ``run-id``).
Messages out: ``arrays`` (training only), ``metrics`` (whitelisted scalars), ``evaluation`` (the
received model's metrics on ``evaluate-split``) and ``site`` (site id, task, split), all passed
through the egress guard and logged in the site workspace.

Under ``secure-aggregation=true`` the server speaks Flower's legacy records (``fitins.*``,
``evaluateins.*``), the only ones its SecAgg+ workflow knows: the handlers answer them with the same
site code, and ``secaggplus_mod`` masks the weights after the egress guard has checked them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from models.protocol import WEIGHTS, Metric, NodeKey, Record, RoundKey, SiteKey, Split

__all__ = ["app", "evaluate", "refusal_message", "train"]

app = ClientApp()


def _inputs(msg: Message, context: Context) -> tuple[Any, Any, str, int, np.ndarray, dict[str, Any]]:
    from fl_client.federated import site_from_config
    from models.config import from_flat

    run_config = dict(context.run_config)
    config = from_flat(run_config)
    site = site_from_config(dict(context.node_config), run_config)
    round_config: dict[str, Any] = dict(msg.content[Record.CONFIG]) if Record.CONFIG in msg.content else {}
    flat = msg.content.array_records[Record.ARRAYS][WEIGHTS].numpy()
    run_id = str(round_config.get(RoundKey.RUN_ID) or msg.metadata.run_id)
    return site, config, run_id, int(round_config.get(RoundKey.SERVER_ROUND, 0)), flat, round_config


def _admit(msg: Message, context: Context, site: Any, config: Any, run_id: str, *, final: bool = False) -> Any:
    """The site's policy and approval for this message (decided by the site's code, from its workspace)."""
    from fl_client.federated import admit

    return admit(site, config, dict(context.run_config), dict(context.node_config), run=str(msg.metadata.run_id),
                 lead_run_id=run_id, final=final)


def _reply(msg: Message, reply: Any) -> Message:
    content = RecordDict({Record.METRICS: MetricRecord(dict(reply.metrics)),
                          Record.SITE: ConfigRecord(dict(reply.strings))})
    if reply.arrays:
        content[Record.ARRAYS] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    if reply.evaluation:
        content[Record.EVALUATION] = MetricRecord(dict(reply.evaluation))
    return Message(content=content, reply_to=msg)


def _guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Let no raw exception out of a handler: Flower would send its text to the server, and it can hold a
    path or a tag value. Each becomes a :class:`fl_client.failures.SiteFailure` (a reason code and a
    sentence), with the details kept in the site's error log; a refusal's own text is the site's already."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        from fl_client.federated import Refused

        try:
            return handler(msg, context)
        except Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a code and a sentence
            raise _site_failure(msg, context, exc) from None

    return guarded


def _site_failure(msg: Message, context: Context, exc: Exception) -> Exception:
    from fl_client.failures import SiteFailure, failure_of, record_failure
    from fl_client.federated import site_from_config

    if isinstance(exc, SiteFailure):
        return exc
    failure = failure_of(exc)
    try:
        site = site_from_config(dict(context.node_config), dict(context.run_config))
        site_id, workspace = site.site_id, site.workspace
    except Exception:  # noqa: BLE001 - no workspace to write to: the failure still leaves without details
        site_id, workspace = str(context.node_config.get(NodeKey.SITE_ID) or "?"), None
    config: dict[str, Any] = (dict(msg.content[Record.CONFIG]) if msg.has_content() and Record.CONFIG in msg.content
                              else {})
    record_failure(workspace, failure, run=str(config.get(RoundKey.RUN_ID) or msg.metadata.run_id),
                   round_number=int(config.get(RoundKey.SERVER_ROUND, 0) or 0), exc=exc)
    return SiteFailure(site_id, failure)


def _secure_aggregation(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ protocol around training, for the messages of a secure-aggregation run only."""
    if "secaggplus_configs" in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[_secure_aggregation])
@_guarded
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the site's training split."""
    from fl_client.federated import fit

    if "fitins.parameters" in msg.content.array_records:
        return _legacy_train(msg, context)
    from fl_client.federated import refusal

    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    mu = float(round_config.get(RoundKey.PROXIMAL_MU, 0.0))
    split = str(round_config.get(RoundKey.EVALUATE_SPLIT, "")) or None
    _check_split(split)
    decision = _admit(msg, context, site, config, run_id)
    if not decision.allowed:
        return _reply(msg, refusal(site, task=config.model.task, run_id=run_id, round_number=rnd, kind="train",
                                   code=decision.code, detail=decision.detail))
    return _reply(msg, fit(site, config, run_id=run_id, round_number=rnd, global_flat=flat, proximal_mu=mu,
                           evaluate_split=split, epsilon_cap=decision.epsilon_cap))


@app.evaluate()
@_guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on one split of the site's data (``val`` unless the config says)."""
    from fl_client.federated import evaluate as evaluate_site
    from fl_client.federated import refusal

    if "evaluateins.parameters" in msg.content.array_records:
        return _legacy_evaluate(msg, context)
    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    split = str(round_config.get(RoundKey.SPLIT, Split.VAL))
    also = str(round_config.get(RoundKey.EVALUATE_SPLIT, "")) or None
    _check_split(split)
    _check_split(also)
    decision = _admit(msg, context, site, config, run_id, final=split == Split.TEST)
    if not decision.allowed:
        return _reply(msg, refusal(site, task=config.model.task, run_id=run_id, round_number=rnd, kind="evaluate",
                                   code=decision.code, detail=decision.detail))
    return _reply(msg, evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=split,
                                     evaluate_split=also))


@app.query()
@_guarded
def query(msg: Message, context: Context) -> Message:
    """The lead's data-summary query: the site's summary (see :mod:`fl_client.summary`) if its policy shares it,
    else a refusal; either passes the egress guard and is logged."""
    from fl_client.federated import data_summary, site_from_config

    site = site_from_config(dict(context.node_config), dict(context.run_config))
    round_config: dict[str, Any] = dict(msg.content[Record.CONFIG]) if Record.CONFIG in msg.content else {}
    run_id = str(round_config.get(RoundKey.RUN_ID) or msg.metadata.run_id)
    reply = data_summary(site, run_id=run_id)
    content = RecordDict({Record.METRICS: MetricRecord(dict(reply.metrics)),
                          Record.SITE: ConfigRecord(dict(reply.strings))})
    if reply.summary:
        content[Record.SUMMARY] = MetricRecord(dict(reply.summary))
    return Message(content=content, reply_to=msg)


def refusal_message(msg: Message, site: Any, *, task: str, code: str, detail: str) -> Message:
    """The reply with which the site refuses a message before reading its run config (a run built for another
    version): a refusal reply, or for Flower's legacy SecAgg+ records an error reply (a drop-out)."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    from fl_client.federated import Refused, refusal

    legacy = any(k in msg.content.array_records for k in ("fitins.parameters", "evaluateins.parameters"))
    round_config: dict[str, Any] = ({} if legacy or Record.CONFIG not in msg.content
                                    else dict(msg.content[Record.CONFIG]))
    kind = {"train": "train", "query": "summary"}.get(str(msg.metadata.message_type), "evaluate")
    reply = refusal(site, task=task, run_id=str(round_config.get(RoundKey.RUN_ID) or msg.metadata.run_id),
                    round_number=int(round_config.get(RoundKey.SERVER_ROUND, 0) or 0), kind=kind, code=code,
                    detail=detail)
    if legacy:
        why = str(Refused(site.site_id, code, detail))
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=why), reply_to=msg)
    return _reply(msg, reply)


def _check_split(split: str | None) -> None:
    from models.config import ConfigError

    if split is not None and split not in tuple(Split):
        raise ConfigError(f"unknown split {split[:20]!r} in the round config: expected train, val or test")


# -- Flower's legacy records: what its SecAgg+ workflow speaks (secure-aggregation=true) ------------------

def _legacy_inputs(msg: Message, context: Context, prefix: str) -> tuple[Any, Any, str, int, np.ndarray, dict]:
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fl_client.federated import site_from_config
    from models.config import from_flat

    ins = (compat.recorddict_to_fitins(msg.content, keep_input=True) if prefix == "fitins"
           else compat.recorddict_to_evaluateins(msg.content, keep_input=True))
    run_config = dict(context.run_config)
    round_config = dict(ins.config)
    flat = parameters_to_ndarrays(ins.parameters)[0]
    run_id = str(round_config.get(RoundKey.RUN_ID) or msg.metadata.run_id)
    return (site_from_config(dict(context.node_config), run_config), from_flat(run_config), run_id,
            int(round_config.get(RoundKey.SERVER_ROUND, 0)), flat, round_config)


def _legacy_train(msg: Message, context: Context) -> Message:
    """Training in a secure-aggregation run: the same site code, the reply in legacy ``FitRes`` records
    (SecAgg+ then masks the weights before they leave; the egress log holds the unmasked digest)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fl_client.federated import Refused, fit, refusal

    site, config, run_id, rnd, flat, round_config = _legacy_inputs(msg, context, "fitins")
    decision = _admit(msg, context, site, config, run_id)
    if not decision.allowed:
        reply = refusal(site, task=config.model.task, run_id=run_id, round_number=rnd, kind="train",
                        code=decision.code, detail=decision.detail)
    else:
        reply = fit(site, config, run_id=run_id, round_number=rnd, global_flat=flat,
                    proximal_mu=float(round_config.get(RoundKey.PROXIMAL_MU, 0.0)), epsilon_cap=decision.epsilon_cap)
    if reply.metrics.get(Metric.REFUSED):
        # In SecAgg+ a site that does not contribute is a drop-out: the protocol goes on without it.
        raise Refused(site.site_id, reply.strings.get(SiteKey.REFUSAL, ""), reply.strings.get(SiteKey.DETAIL, ""))
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([reply.arrays[WEIGHTS]]),
                 num_examples=int(reply.metrics[Metric.NUM_EXAMPLES]), metrics={**reply.metrics, **reply.strings})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _legacy_evaluate(msg: Message, context: Context) -> Message:
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    from fl_client.federated import Refused, refusal
    from fl_client.federated import evaluate as evaluate_site

    site, config, run_id, rnd, flat, round_config = _legacy_inputs(msg, context, "evaluateins")
    split = str(round_config.get(RoundKey.SPLIT, Split.VAL))
    _check_split(split)
    decision = _admit(msg, context, site, config, run_id, final=split == Split.TEST)
    if not decision.allowed:
        refusal(site, task=config.model.task, run_id=run_id, round_number=rnd, kind="evaluate", code=decision.code,
                detail=decision.detail)
        raise Refused(site.site_id, decision.code, decision.detail)
    reply = evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=split)
    res = EvaluateRes(status=Status(Code.OK, ""), loss=float(reply.metrics.get(Metric.EVAL_LOSS, 0.0)),
                      num_examples=int(reply.metrics.get(Metric.STUDIES, 0)),
                      metrics={**reply.metrics, **reply.strings})
    return Message(content=compat.evaluateres_to_recorddict(res), reply_to=msg)
