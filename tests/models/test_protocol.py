"""The contract between site and server (``models.protocol``): the text form of a refusal or failure survives
Flower's wrapping, the egress whitelists are the enums, and the wire keys are spelled nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from models.evaluation import SCORE_BINS
from models.protocol import (
    ALLOWED_METRICS,
    ALLOWED_STRINGS,
    EVAL_METRICS,
    HISTOGRAM_KEYS,
    PRIVACY_METRICS,
    REFUSAL_METRICS,
    SUBGROUP_KEYS,
    TRAIN_METRICS,
    WEIGHTS,
    FailureCode,
    Metric,
    NodeKey,
    ParsedFailure,
    Record,
    Refusal,
    RoundKey,
    SiteKey,
    failure_text,
    histogram_metrics,
    parse_failure,
    reason_codes,
    split_histograms,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("wrap", [
    "{}",  # as the site's executor sends it
    "<class 'fl_client.failures.SiteFailure'>:<'{}'>",  # as Flower wraps a ClientApp exception in a deployment
    "Exception: {}\\nTraceback (most recent call last):\\n  File ...",  # a simulation's escaped traceback
    "ClientApp raised an exception\n{}\nTraceback ...",  # real newlines
])
def test_a_failure_is_read_back_from_any_wrapping(wrap: str) -> None:
    text = failure_text("b", FailureCode.DATA_UNREADABLE, "a file the site ingested could not be read")
    assert parse_failure(wrap.format(text)) == ParsedFailure("b", "data-unreadable",
                                                             "a file the site ingested could not be read")


def test_text_that_is_not_a_failure_is_not_read_as_one() -> None:
    assert parse_failure("Connection reset by peer") is None
    assert parse_failure("") is None


def test_the_whitelists_are_the_enums_and_the_codes_do_not_collide() -> None:
    assert set(TRAIN_METRICS + EVAL_METRICS + PRIVACY_METRICS + REFUSAL_METRICS) == set(Metric)
    assert set(Metric) | HISTOGRAM_KEYS | SUBGROUP_KEYS == ALLOWED_METRICS and len(HISTOGRAM_KEYS) == 2 * SCORE_BINS
    assert not (HISTOGRAM_KEYS | SUBGROUP_KEYS) & set(Metric)
    assert set(SiteKey) == ALLOWED_STRINGS
    assert not set(Refusal) & set(FailureCode)
    assert reason_codes() == set(Refusal) | set(FailureCode)


# A dict key of the site's own records that happens to equal a record name (not a wire key).
ALLOWED = {("fl_client/policy.py", "metrics"), ("fl_server/export.py", "metrics"),  # + the model card's section
           ("fl_server/status.py", "run-id")}  # + a field of Flower's own run listing


def _spelled(path: Path, values: set[str]) -> list[tuple[int, str]]:
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        constant = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            constant = node.slice
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "setdefault", "pop") and node.args
              and isinstance(node.args[0], ast.Constant)):
            constant = node.args[0]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and any(
                isinstance(op, ast.In | ast.NotIn) for op in node.ops):
            constant = node.left
        elif isinstance(node, ast.Dict):
            hits += [(k.lineno, k.value) for k in node.keys if isinstance(k, ast.Constant) and k.value in values]
        if constant is not None and constant.value in values:
            hits.append((constant.lineno, constant.value))
    return hits


def test_wire_keys_are_spelled_only_in_the_protocol_module() -> None:
    # "site" and "split" are also fields of the run history's entries and of the site's saliency documents.
    wire = {str(v) for v in (*Record, *RoundKey, *NodeKey, WEIGHTS)} - {Record.SITE, RoundKey.SPLIT}
    found = []
    for package in ("fl_client", "fl_server"):
        for path in sorted((ROOT / package).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}:{line} {value!r}" for line, value in _spelled(path, wire) if (rel, value) not in ALLOWED]
    assert not found, "use models.protocol's keys:\n" + "\n".join(found)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 2.5, 1e12])
def test_a_histogram_that_is_not_counts_is_left_out_not_summed(bad: float) -> None:
    pos, neg = [0.0] * SCORE_BINS, [0.0] * SCORE_BINS
    pos[40], neg[20] = 12.0, 15.0
    rest, got_pos, got_neg = split_histograms({Metric.AUROC: 0.8, **histogram_metrics(pos, neg)})
    assert (rest, got_pos, got_neg) == ({Metric.AUROC: 0.8}, pos, neg)
    neg[21] = bad  # a site (or a hand on the wire) sends a count no evaluation makes
    rest, got_pos, got_neg = split_histograms({Metric.AUROC: 0.8, **histogram_metrics(pos, neg)})
    assert rest == {Metric.AUROC: 0.8} and got_pos is None and got_neg is None
