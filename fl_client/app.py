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

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _inputs(msg: Message, context: Context) -> tuple[Any, Any, str, int, np.ndarray, dict[str, Any]]:
    from fl_client.federated import site_from_config
    from models.config import from_flat

    run_config = dict(context.run_config)
    config = from_flat(run_config)
    site = site_from_config(dict(context.node_config), run_config)
    round_config: dict[str, Any] = dict(msg.content["config"]) if "config" in msg.content else {}
    flat = msg.content.array_records["arrays"]["weights"].numpy()
    run_id = str(round_config.get("run-id") or msg.metadata.run_id)
    return site, config, run_id, int(round_config.get("server-round", 0)), flat, round_config


def _reply(msg: Message, reply: Any) -> Message:
    content = RecordDict({"metrics": MetricRecord(dict(reply.metrics)), "site": ConfigRecord(dict(reply.strings))})
    if reply.arrays:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    if reply.evaluation:
        content["evaluation"] = MetricRecord(dict(reply.evaluation))
    return Message(content=content, reply_to=msg)


def _secure_aggregation(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's SecAgg+ protocol around training, for the messages of a secure-aggregation run only."""
    if "secaggplus_configs" in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[_secure_aggregation])
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the site's training split."""
    from fl_client.federated import fit

    if "fitins.parameters" in msg.content.array_records:
        return _legacy_train(msg, context)
    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    mu = float(round_config.get("proximal-mu", 0.0))
    split = str(round_config.get("evaluate-split", "")) or None
    _check_split(split)
    return _reply(msg, fit(site, config, run_id=run_id, round_number=rnd, global_flat=flat, proximal_mu=mu,
                           evaluate_split=split))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on one split of the site's data (``val`` unless the config says)."""
    from fl_client.federated import evaluate as evaluate_site

    if "evaluateins.parameters" in msg.content.array_records:
        return _legacy_evaluate(msg, context)
    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    split = str(round_config.get("split", "val"))
    also = str(round_config.get("evaluate-split", "")) or None
    _check_split(split)
    _check_split(also)
    return _reply(msg, evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=split,
                                     evaluate_split=also))


def _check_split(split: str | None) -> None:
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} in the round config: expected train, val or test")


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
    run_id = str(round_config.get("run-id") or msg.metadata.run_id)
    return (site_from_config(dict(context.node_config), run_config), from_flat(run_config), run_id,
            int(round_config.get("server-round", 0)), flat, round_config)


def _legacy_train(msg: Message, context: Context) -> Message:
    """Training in a secure-aggregation run: the same site code, the reply in legacy ``FitRes`` records
    (SecAgg+ then masks the weights before they leave; the egress log holds the unmasked digest)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fl_client.federated import WEIGHTS_KEY, fit

    site, config, run_id, rnd, flat, round_config = _legacy_inputs(msg, context, "fitins")
    reply = fit(site, config, run_id=run_id, round_number=rnd, global_flat=flat,
                proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    if reply.metrics.get("refused"):
        # In SecAgg+ a site that does not contribute is a drop-out: the protocol goes on without it.
        why = "privacy budget spent" if reply.metrics.get("refused-budget") else "no training data for the task"
        raise RuntimeError(f"site {site.site_id} does not train this round: {why}")
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([reply.arrays[WEIGHTS_KEY]]),
                 num_examples=int(reply.metrics["num-examples"]), metrics={**reply.metrics, **reply.strings})
    return Message(content=compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def _legacy_evaluate(msg: Message, context: Context) -> Message:
    from flwr.common import Code, EvaluateRes, Status
    from flwr.compat.common import recorddict_compat as compat

    from fl_client.federated import evaluate as evaluate_site

    site, config, run_id, rnd, flat, round_config = _legacy_inputs(msg, context, "evaluateins")
    split = str(round_config.get("split", "val"))
    _check_split(split)
    reply = evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=split)
    res = EvaluateRes(status=Status(Code.OK, ""), loss=float(reply.metrics.get("eval-loss", 0.0)),
                      num_examples=int(reply.metrics.get("studies", 0)), metrics={**reply.metrics, **reply.strings})
    return Message(content=compat.evaluateres_to_recorddict(res), reply_to=msg)
