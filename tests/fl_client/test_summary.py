"""The site's data summary for the lead (``fl_client.summary``, the ClientApp's query handler) and the
consortium's view of it (``fl_server.summary``): fixed vocabularies only, small counts suppressed, the site's
policy decides, everything through the egress guard and in the egress log; the warnings the lead reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from consortium import make_workspaces
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fl_client.app import app
from fl_client.egress import EgressError, EgressLog, check_reply
from fl_client.policy import RunBook, SitePolicy
from fl_server.summary import build_summary, warnings_of, write_summary
from models.protocol import SUPPRESSED, model_family_of, summary_keys
from models.tasks import TASK_DIMS


@pytest.fixture(autouse=True)
def _inside_a_run() -> None:
    """Flower's messages carry the run's identity, which a ClientApp process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 9, 1, 1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("summary")
    return make_workspaces(root, sites=1, studies_per_task=12, seed=21, tasks=["lung-ct", "prostate-mr"]) / "site-a"


def _query(workspace: Path) -> Message:
    msg = Message(content=RecordDict({"config": ConfigRecord({"run-id": "lead-9"})}), dst_node_id=1,
                  message_type="query")
    context = Context(run_id=9, node_id=1, node_config={"workspace": str(workspace), "site-id": "a"},
                      state=RecordDict(), run_config={"task": "lung-ct"})
    return app(message=msg, context=context)


def test_the_site_answers_with_counts_on_fixed_bins_and_suppresses_small_ones(workspace: Path) -> None:
    reply = _query(workspace)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    summary = {k: float(v) for k, v in reply.content["summary"].items()}
    assert set(summary) <= summary_keys(tuple(TASK_DIMS))
    assert summary["lung-ct:labelled"] >= 5 and summary["breast-mg:labelled"] == 0
    small = [k for k, v in summary.items() if v == SUPPRESSED]
    assert summary["lung-ct:suppressed"] + summary["prostate-mr:suppressed"] == len(small)
    assert all(v >= 0 or v == SUPPRESSED for v in summary.values())
    shares = [summary[f"lung-ct:intensity:{i}"] for i in range(16)]
    assert abs(sum(shares) - 1.0) < 1e-3  # a histogram of the preprocessed images, as shares
    assert any(k.startswith("lung-ct:vendor:") for k in summary) and any(k.startswith("prostate-mr:field-t:")
                                                                          for k in summary)
    # Scanner lines from ManufacturerModelName: a fixed vocabulary, never the tag's text (site a: SOMATOM).
    assert [k for k in summary if k.startswith("lung-ct:model:")] == ["lung-ct:model:somatom"]
    (record,) = [r for r in EgressLog(workspace).records() if r.kind == "summary"]
    assert record.metrics == summary and record.run == "lead-9"
    # The minimum is the site's: with 1 nothing is suppressed.
    book = RunBook(workspace)
    book.set_policy(SitePolicy(min_count=1), who="dpo")
    loose = {k: float(v) for k, v in _query(workspace).content["summary"].items()}
    assert SUPPRESSED not in loose.values()
    # DP-SGD's unit: the training patients (at most the training studies; a patient may have several)
    assert 1 <= loose["lung-ct:train:patients"] <= loose["lung-ct:train:pos"] + loose["lung-ct:train:neg"]
    book.set_policy(SitePolicy(share_summary=False), who="dpo")
    refused = _query(workspace)
    assert refused.content["metrics"]["refused"] == 1 and "summary" not in refused.content
    assert refused.content["site"]["refusal"] == "summary-not-shared"
    book.set_policy(SitePolicy(), who="dpo")


def test_the_egress_guard_refuses_any_other_summary_field() -> None:
    with pytest.raises(EgressError, match="summary field 'lung-ct:manufacturer:ACME'"):
        check_reply({}, {}, reference=None, summary={"lung-ct:manufacturer:ACME": 3.0})
    with pytest.raises(EgressError, match="must be a count or a share"):
        check_reply({}, {}, reference=None, summary={"lung-ct:studies": -5.0})


def test_scanner_lines_are_a_fixed_vocabulary() -> None:
    assert model_family_of("SOMATOM Definition AS+") == "somatom"
    assert model_family_of("Senographe Pristina") == "senographe"
    assert model_family_of("IQon - Spectral CT") == "iqon"
    assert model_family_of("SIGNA Artist") == "signa"
    assert model_family_of("Room 3 scanner of St Mary's") == "other"
    assert model_family_of("") == "other"


def _site(name: str, *, val_pos: float, vendor: str, slices: str, hist: list[float], train: float) -> dict:
    summary = {"lung-ct:studies": 40.0, "lung-ct:labelled": 40.0, "lung-ct:train:pos": train / 2,
               "lung-ct:train:neg": train / 2, "lung-ct:val:pos": val_pos, "lung-ct:val:neg": 5.0,
               "lung-ct:test:pos": 5.0, "lung-ct:test:neg": 5.0, f"lung-ct:vendor:{vendor}": 40.0,
               f"lung-ct:slice-mm:{slices}": 40.0}
    summary.update({f"lung-ct:intensity:{i}": v for i, v in enumerate(hist)})
    return {"site": name, "values": summary}


def test_the_lead_reads_warnings_in_plain_words(tmp_path: Path) -> None:
    flat = [1 / 16] * 16
    peaked = [1.0] + [0.0] * 15
    replies = [_site("a", val_pos=6, vendor="siemens", slices="1-2", hist=flat, train=30),
               _site("b", val_pos=0, vendor="siemens", slices="1-2", hist=flat, train=30),
               _site("c", val_pos=SUPPRESSED, vendor="ge", slices="1-2", hist=peaked, train=120),
               _site("e", val_pos=6, vendor="siemens", slices="1-2", hist=flat, train=120),
               {"site": "d", "refused": {"code": "summary-not-shared", "reason": "this site does not share a data "
                                                                                 "summary"}}]
    replies[3]["values"]["lung-ct:train:patients"] = 30.0  # 120 studies of 30 patients: DP-SGD samples the 30
    replies[2]["values"]["lung-ct:train:patients"] = SUPPRESSED  # 120 studies of fewer than 5 patients
    doc = build_summary(replies, run_config={"task": "lung-ct", "dp": True, "dp-epsilon": 2.0, "num-rounds": 10})
    text = "\n".join(doc["warnings"])
    assert "site b has no positive study in its val split" in text
    assert "site c has no positive" not in text  # suppressed means 1 to 4, not none
    assert "only site c has a scanner vendor ge" in text
    assert "site c's preprocessed intensities are far from the others'" in text
    assert "site a has about 30 training studies; DP-SGD at the run's ε over all its rounds needs a noise " in text
    assert "site c has about" not in text  # not its 120 studies: its patients, fewer than its minimum
    assert "site c has fewer training patients than its minimum count" in text
    assert "site e has about 30 training patients; DP-SGD" in text
    assert doc["refused"] == [{"site": "d", "code": "summary-not-shared",
                               "reason": "this site does not share a data summary"}]
    assert warnings_of(doc, {"task": "lung-ct"}) == [w for w in doc["warnings"] if "DP-SGD" not in w]
    page = write_summary(tmp_path, doc)
    assert "no positive study" in page.read_text() and (tmp_path / "summary" / "lung-ct.png").is_file()


def test_intensity_bins_span_each_normalisation() -> None:
    """MR is z-scored (±4), CT windowed and MG scaled to [0, 1]: the summary's fixed bins follow the preset's kind."""
    from fl_client.summary import _intensity_edges
    from imaging.presets import PRESETS

    assert _intensity_edges(PRESETS["prostate-mr"].intensity)[[0, -1]].tolist() == [-4.0, 4.0]
    for task in ("lung-ct", "breast-mg", "colorectal-ct"):
        assert _intensity_edges(PRESETS[task].intensity)[[0, -1]].tolist() == [0.0, 1.0], task
