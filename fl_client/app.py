"""The site's Flower ClientApp: thin handlers around :mod:`fl_client.federated`.

Flower may start a fresh process for every message, so this module imports only Flower's records at
load time; torch, MONAI and the training code are imported inside the handlers.

Messages in (from the server): ``arrays`` (one packed float32 array ``weights``) and ``config``
(``server-round``, optional ``proximal-mu``, ``split`` for evaluation, ``evaluate-split`` to also
evaluate the received model on that split in the same message, ``run-id``).
Messages out: ``arrays`` (training only), ``metrics`` (whitelisted scalars), ``evaluation`` (the
received model's metrics on ``evaluate-split``) and ``site`` (site id, task, split), all passed
through the egress guard and logged in the site workspace.
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the site's training split."""
    from fl_client.federated import fit

    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    mu = float(round_config.get("proximal-mu", 0.0))
    split = str(round_config.get("evaluate-split", "")) or None
    _check_split(split)
    return _reply(msg, fit(site, config, run_id=run_id, round_number=rnd, global_flat=flat, proximal_mu=mu,
                           evaluate_split=split))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on one split of the site's data (``val`` unless the config says)."""
    from dataclasses import replace

    from fl_client.federated import evaluate as evaluate_site

    site, config, run_id, rnd, flat, round_config = _inputs(msg, context)
    split = str(round_config.get("split", "val"))
    also = str(round_config.get("evaluate-split", "")) or None
    _check_split(split)
    _check_split(also)
    reply = evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=split)
    if also:
        extra = evaluate_site(site, config, run_id=run_id, round_number=rnd, global_flat=flat, split=also)
        reply = replace(reply, evaluation=extra.metrics)
    return _reply(msg, reply)


def _check_split(split: str | None) -> None:
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r} in the round config: expected train, val or test")
