"""The egress guard refuses anything but model arrays and whitelisted scalars; the log is append-only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fl_client.egress import EgressError, EgressLog, check_reply, digest

REF = {"weights": np.zeros(10, np.float32)}


def test_model_arrays_and_whitelisted_metrics_pass() -> None:
    check_reply({"weights": np.ones(10, np.float32)}, {"num-examples": 12, "train-loss": 0.5, "epsilon": 1.2},
                reference=REF, strings={"site-id": "a", "task": "lung-ct"})


@pytest.mark.parametrize(("arrays", "metrics", "strings", "needle"), [
    ({"weights": np.ones(10, np.float32), "image": np.ones((4, 4), np.float32)}, {}, {}, "'image'"),
    ({"weights": np.ones(11, np.float32)}, {}, {}, "'weights'"),
    ({"weights": np.ones(10, np.float64)}, {}, {}, "'weights'"),
    ({"weights": np.full(10, np.nan, np.float32)}, {}, {}, "NaN"),
    ({}, {"patient-age": 63.0}, {}, "'patient-age'"),
    ({}, {"auroc": float("inf")}, {}, "'auroc'"),
    ({}, {"auroc": "0.9"}, {}, "'auroc'"),
    ({}, {}, {"patient-id": "123"}, "'patient-id'"),
    ({}, {}, {"site-id": "x" * 100}, "'site-id'"),
])
def test_anything_else_raises_and_names_it(arrays: dict, metrics: dict, strings: dict, needle: str) -> None:
    with pytest.raises(EgressError, match=needle.replace("(", r"\(")):
        check_reply(arrays, metrics, reference=REF, strings=strings)


def test_arrays_without_a_global_model_are_refused() -> None:
    with pytest.raises(EgressError, match="global model"):
        check_reply({"weights": np.ones(10, np.float32)}, {}, reference=None)


def test_log_appends_hash_bytes_and_metric_keys(tmp_path: Path) -> None:
    log = EgressLog(tmp_path)
    w = {"weights": np.arange(10, dtype=np.float32)}
    log.append(run="r1", round_number=1, kind="train", arrays=w, metrics={"num-examples": 3}, strings={"site-id": "a"})
    log.append(run="r1", round_number=1, kind="evaluate-val", arrays={}, metrics={"auroc": 0.8})
    records = log.records()
    assert [r.kind for r in records] == ["train", "evaluate-val"]
    assert records[0].sha256 == digest(w)[0] and records[0].bytes == 40
    assert records[1].bytes == 0 and records[1].sha256 == ""
    lines = (tmp_path / "egress.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["metrics"] == {"num-examples": 3.0}
    assert (tmp_path / "egress.jsonl").stat().st_mode & 0o077 == 0  # readable by the site user only
