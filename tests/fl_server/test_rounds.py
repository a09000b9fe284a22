"""One round recorder for both ways a round runs, and one typed record read back (``fl_server.rounds``); SecAgg+
failures are named by the site that raised them (``fl_server.secure.failure_entry``)."""

from __future__ import annotations

import json

import pytest

from fl_server.rounds import RoundRecord, RoundRecorder, new_round, weighted_by_studies
from fl_server.secure import failure_entry
from models.protocol import FailureCode, Refusal, failure_text


def test_a_recorded_round_reads_back_as_the_typed_record_and_survives_json() -> None:
    rec = RoundRecorder(new_round(4))
    rec.asked(3)
    rec.trained("a", {"num-examples": 40, "train-loss": 0.5, "train-seconds": 2.0, "epsilon": 1.25})
    rec.trained("b", {"num-examples": 20, "train-loss": 0.7, "train-seconds": 3.0})
    rec.trained("c", {"refused": 1, "refused-budget": 1, "num-examples": 0, "epsilon": 8.0, "epsilon-max": 8.0})
    rec.refused("c", {"code": Refusal.BUDGET, "reason": "privacy budget spent"},
                metrics={"epsilon": 8.0, "epsilon-max": 8.0})
    rec.update_norm("a", 1.5)
    rec.dropped("b", "update norm 40 is 26.7x the median")
    rec.failed("d", "oncofed site d: task-crashed: ...", stage="train")
    rec.failed("d", "oncofed site d: task-crashed: ...", stage="train")  # once per site, stage and reason
    rec.aggregated(1, {"train-loss": 0.5})
    rec.evaluated("a", {"studies": 10, "auroc": 0.8, "eval-seconds": 1.0})
    rec.evaluated("b", {"studies": 30, "auroc": 0.6, "eval-seconds": 4.0})
    rec.aggregated_evaluation()
    rec.timed(10.0, separate_evaluation=True)
    rec.checkpointed("checkpoints/round-004.pt")

    record = RoundRecord.from_dict(json.loads(json.dumps(rec.record)))
    assert record.round == 4 and record.asked_train == 3 and record.aggregated_sites == 1
    assert record.aggregated_evaluate["auroc"] == pytest.approx((10 * 0.8 + 30 * 0.6) / 40)
    assert record.slowest_site_seconds == 3.0 + 4.0 and record.overhead == pytest.approx(0.3)
    assert len(record.failed) == 1 and record.refused[0]["epsilon_max"] == 8.0
    assert record.took_part("a") and not record.took_part("b") and not record.took_part("c")
    assert record.train["a"]["update-norm"] == 1.5 and record.sites() == ["a", "b", "c"]
    line = record.progress_line()
    assert line.startswith("round   4") and "a:ε=1.25" in line and "dropped b" in line and "failed d" in line
    assert "refused c (privacy budget spent)" in line


def test_an_old_history_entry_reads_with_defaults() -> None:
    record = RoundRecord.from_dict({"round": 0, "aggregated_sites": 0})
    assert record.train == {} and record.refused == () and record.seconds is None and record.checkpoint is None


def test_weighting_by_studies_leaves_out_sites_without_an_auroc() -> None:
    assert weighted_by_studies([{"studies": 10, "auroc": 1.0}, {"studies": 30, "auroc": 0.5},
                                {"studies": 5}, {"studies": 0, "auroc": 0.9}]) == {"auroc": 0.625}


def test_a_secure_aggregation_failure_is_named_by_its_site() -> None:
    text = failure_text("c", Refusal.PENDING, "run 7 waits for the site's approval")
    assert failure_entry(Exception(f"<class 'fl_client.federated.Refused'>:<'{text}'>")) == (
        "c", "run 7 waits for the site's approval")
    crashed = failure_text("a", FailureCode.TASK_CRASHED, "the task process died")
    assert failure_entry(RuntimeError(crashed + "\\nTraceback ...")) == ("a", "the task process died")
    assert failure_entry(TimeoutError("no reply")) == ("?", "no reply")
