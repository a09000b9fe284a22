"""The site's policy, its run records and audit log, and the ClientApp's refusals before any training.

The ClientApp is called here as the site's executor calls it (``fl_client.app.app(message, context)``),
on a real ingested workspace; the deployed path is in ``tests/fl_client/test_executor.py``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from consortium import make_workspaces
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fl_client.app import app
from fl_client.cli import main as site_main
from fl_client.egress import EgressLog
from fl_client.failures import SiteFailure, failure_of
from fl_client.federated import Refused, run_manifest
from fl_client.policy import PolicyError, RunBook, RunState, SitePolicy
from fl_client.privacy import PrivacyLedger
from fl_client.workspace import Workspace
from models.config import ConfigError, from_flat
from models.nets import build_model
from models.protocol import Refusal
from models.weights import pack, state_arrays

RUN_CONFIG = {"task": "breast-mg", "num-rounds": 3, "threads": 1}


@pytest.fixture(autouse=True)
def _inside_a_run() -> None:
    """Flower's messages carry the run's identity, which a ClientApp process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 7
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspaces(tmp_path_factory.mktemp("policy"), sites=1, studies_per_task=8, seed=3, tasks=["breast-mg"])


@pytest.fixture()
def workspace(sites: Path, tmp_path: Path) -> Path:
    """A fresh copy of the ingested site (its policy and records start empty)."""
    import shutil

    ws = tmp_path / "site-a"
    shutil.copytree(sites / "site-a", ws)
    return ws


def _message(kind: str = "train", *, run_config: dict | None = None, split: str = "") -> Message:
    config = from_flat({**RUN_CONFIG, **(run_config or {})})
    flat = pack(state_arrays(build_model(config.model)))
    round_config: dict = {"server-round": 1, "run-id": "lead-7"}
    if split:
        round_config["split"] = split
    content = RecordDict({"arrays": ArrayRecord({"weights": Array(flat)}), "config": ConfigRecord(round_config)})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _call(workspace: Path, kind: str = "train", *, run_config: dict | None = None, split: str = "") -> Message:
    """The ClientApp on one message, with the node config the site's executor gives it."""
    msg = _message(kind, run_config=run_config, split=split)
    node_config: dict = {"workspace": str(workspace), "site-id": "a", "app-bundle": "oncofed/oncofed==0.1.0",
                         "app-bundle-sha256": "ab" * 32}
    context = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={**RUN_CONFIG, **(run_config or {})})
    return app(message=msg, context=context)


def _refusal(reply: Message) -> tuple[str, str]:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["refused"] == 1 and "arrays" not in reply.content
    site = reply.content["site"]
    return str(site["refusal"]), str(site["detail"])


def test_default_policy_trains_and_records_the_run_with_its_manifest(workspace: Path) -> None:
    reply = _call(workspace)
    assert not reply.has_error() and "arrays" in reply.content and not reply.content["metrics"].get("refused")
    record = RunBook(workspace).get("7")
    assert record is not None and record.state == RunState.APPROVED and record.decided_by == "site policy"
    m = record.manifest
    assert (m.task, m.rounds, m.network, m.lead_run_id, m.app) == ("breast-mg", 3, "compact-cnn", "lead-7",
                                                                   "oncofed/oncofed==0.1.0")
    assert m.parameters > 1000 and m.app_hash == "ab" * 32 and "auroc" in m.metrics and "epsilon" not in m.metrics
    assert record.messages == {"answered": 1}
    # The final test evaluation closes the run at the site.
    _call(workspace, "evaluate", split="test")
    assert RunBook(workspace).get("7").state == RunState.FINISHED  # type: ignore[union-attr]
    audit = RunBook(workspace).audit()
    assert [e["action"] for e in audit] == ["run-seen (approved)"] and audit[0]["shown"] == m.lines()


@pytest.mark.parametrize(("policy", "run_config", "code", "needle"), [
    (SitePolicy(tasks=("lung-ct",)), {}, Refusal.TASK, "takes part in lung-ct only, not breast-mg"),
    (SitePolicy(max_rounds=2), {}, Refusal.ROUNDS, "at most 2 rounds per run; the run has 3"),
    (SitePolicy(max_local_epochs=1), {"local-epochs": 3}, Refusal.LOCAL_EPOCHS, "at most 1 local epochs"),
    (SitePolicy(max_local_epochs=2), {"augmentation-multiplicity": 3}, Refusal.LOCAL_EPOCHS,
     "the run asks 1 with each sample drawn 3 times (3 passes)"),
    (SitePolicy(networks=("densenet-small",)), {}, Refusal.NETWORK, "densenet-small only, not compact-cnn"),
    (SitePolicy(resolutions=("cpu",)), {"resolution": "diagnostic"}, Refusal.RESOLUTION,
     "trains at the cpu resolution profile only, not diagnostic"),
])
def test_a_run_outside_the_policy_is_refused_before_any_training(workspace: Path, policy: SitePolicy,
                                                                   run_config: dict, code: str, needle: str) -> None:
    RunBook(workspace).set_policy(policy, who="dpo")
    for kind, split in (("train", ""), ("evaluate", "val")):
        got_code, detail = _refusal(_call(workspace, kind, run_config=run_config, split=split))
        assert got_code == code and needle in detail
    record = RunBook(workspace).get("7")
    assert record is not None and record.state == RunState.REFUSED and record.messages == {"refused": 2}
    # Nothing trained: no training record left the site, only the two refusals.
    assert [r.kind for r in EgressLog(workspace).records()] == ["train-refused", "evaluate-refused"]
    assert [e["action"] for e in RunBook(workspace).audit()] == ["policy-set", "run-seen (refused)"]


def test_approval_pending_then_approved_then_trained_and_refused_stays_refused(workspace: Path) -> None:
    book = RunBook(workspace)
    book.set_policy(SitePolicy(require_approval=True), who="dpo")
    code, detail = _refusal(_call(workspace))
    assert code == Refusal.PENDING and "waits for the site's approval" in detail
    assert book.get("7").state == RunState.PENDING  # type: ignore[union-attr]
    book.decide("7", RunState.APPROVED, who="Dr. W")
    reply = _call(workspace)
    assert "arrays" in reply.content and reply.content["metrics"]["num-examples"] > 0
    book.decide("7", RunState.REFUSED, who="Dr. W", why="ethics approval ended for patient group X")
    code, detail = _refusal(_call(workspace))
    # The operator's reason stays at the site: the lead learns only that the site refused.
    assert code == Refusal.REFUSED and detail == "the site refused run 7"
    book.set_policy(SitePolicy(), who="dpo")  # lifting the approval rule does not undo a refusal
    assert _refusal(_call(workspace))[0] == Refusal.REFUSED
    actions = [(e["who"], e["action"]) for e in book.audit()]
    assert actions == [("dpo", "policy-set"), ("site policy", "run-seen (pending)"), ("Dr. W", "approved"),
                       ("Dr. W", "refused"), ("dpo", "policy-set")]
    assert book.audit()[3]["why"] == "ethics approval ended for patient group X"
    assert book.audit()[2]["shown"] == book.get("7").manifest.lines()  # type: ignore[union-attr]


def test_the_policy_caps_epsilon_per_run_and_a_dp_only_site_trains_with_dp(workspace: Path) -> None:
    PrivacyLedger(workspace).set_budget(20.0, 1e-5, require_dp=True)
    RunBook(workspace).set_policy(SitePolicy(max_epsilon_per_run=1.5), who="dpo")
    reply = _call(workspace, run_config={"dp": False, "dp-epsilon": 8.0})  # the run asks no DP, and ε 8
    metrics = reply.content["metrics"]
    assert metrics["dp"] == 1 and 0 < metrics["epsilon"] <= 1.5 + 1e-6


def test_legacy_records_refuse_as_a_drop_out_with_the_sites_sentence() -> None:
    exc = Refused("a", Refusal.PENDING, "run 7 waits for the site's approval")
    assert str(exc) == "oncofed site a: pending-approval: run 7 waits for the site's approval"
    from models.protocol import ParsedFailure, parse_failure

    # As Flower wraps it in a deployment, and as a simulation appends the traceback: the server reads it back.
    expected = ParsedFailure("a", "pending-approval", "run 7 waits for the site's approval")
    assert parse_failure(f"<class 'fl_client.federated.Refused'>:<'{exc}'>") == expected
    assert parse_failure(f"Exception: {exc}\\nTraceback (most recent call last): ...") == expected


@pytest.mark.parametrize(("exc", "code"), [
    (FileNotFoundError(2, "No such file or directory", "/data/Doe^Jane_1960/CT/IM0001.dcm"), "data-unreadable"),
    (PermissionError(13, "Permission denied", "/data/Doe^Jane_1960"), "data-unreadable"),
    (OSError(5, "Input/output error", "/data/Doe^Jane_1960/CT"), "io-error"),
    (KeyError("1.2.826.0.1.3680043.8.498.1"), "site-error"),
    (ValueError("PatientName Doe^Jane is odd"), "site-error"),
    (MemoryError(), "out-of-memory"),
])
def test_failures_leave_the_site_as_a_code_and_a_sentence_without_the_exceptions_text(exc: BaseException,
                                                                                       code: str) -> None:
    failure = failure_of(exc)
    assert failure.code == code
    reason = failure.reason("a")
    assert reason.startswith(f"oncofed site a: {code}: ")
    for secret in ("Doe", "Jane", "/data", "1.2.826", "IM0001"):
        assert secret not in reason


def test_a_handler_failure_leaves_as_a_code_and_a_sentence_and_the_details_stay(
        workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_client.federated

    def moved(*_: object, **__: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", "/data/Doe^Jane_1960/MG/IM0001.dcm")

    monkeypatch.setattr(fl_client.federated, "load_site_data", moved)
    with pytest.raises(SiteFailure) as info:
        _call(workspace)
    assert str(info.value) == ("oncofed site a: data-unreadable: a file the site ingested could not be read: "
                               "restore it or ingest again")
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained text to format
    (error,) = [r for r in EgressLog(workspace).records() if r.kind == "error"]
    assert error.strings == {"reason": "data-unreadable", "detail": info.value.failure.sentence}
    assert error.run == "lead-7" and error.round == 1
    assert "/data/Doe^Jane_1960/MG/IM0001.dcm" in Workspace(workspace).error_log.read_text()  # kept at the site
    # A run-config mistake of the lead's names the key; the refusal of a split the site does not know too.
    msg = _message()
    msg.content["config"]["evaluate-split"] = "everything"
    context = Context(run_id=7, node_id=1, node_config={"workspace": str(workspace), "site-id": "a"},
                      state=RecordDict(), run_config=dict(RUN_CONFIG))
    with pytest.raises(SiteFailure, match="run-config: unknown split 'everything'"):
        app(message=msg, context=context)


def test_a_run_config_error_names_the_key_the_lead_sent() -> None:
    with pytest.raises(ConfigError) as info:
        from_flat({"task": "breast-mg", "local-epochs": "many"})
    failure = failure_of(info.value)
    assert failure.code == "run-config" and "local-epochs" in failure.sentence


def test_policy_records_survive_a_crash_mid_write(workspace: Path) -> None:
    book = RunBook(workspace)
    book.set_policy(SitePolicy(max_rounds=5), who="dpo")
    # A kill -9 during a write leaves at most a temporary file beside the record, never a half record.
    (book.root / ".policy.json.999.tmp").write_text('{"max_rounds": ')
    assert book.policy().max_rounds == 5
    (book.root / "policy.json").write_text('{"max_rounds": ')  # damaged by hand: refuse to guess
    with pytest.raises(PolicyError, match="is damaged"):
        book.policy()


def test_manifest_lists_privacy_metrics_only_under_dp(workspace: Path) -> None:
    config = from_flat({**RUN_CONFIG, "dp": True, "dp-epsilon": 3})
    m = run_manifest(config, {}, {}, run="9", lead_run_id="9")
    assert m.dp and m.dp_epsilon == 3 and "epsilon" in m.metrics and m.app == "simulation"
    assert any("DP-SGD asked, ε ≤ 3" in line for line in m.lines())
    assert replace(m, dp=False).lines() != m.lines()


def test_cli_policy_runs_approve_refuse(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = str(workspace)
    assert site_main(["policy", "--workspace", ws, "--tasks", "breast-mg,lung-ct", "--max-rounds", "10",
                      "--approval", "required", "--by", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "breast-mg, lung-ct" in out and "at most 10" in out and "approval" in out
    assert site_main(["policy", "--workspace", ws, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "oncofed.site-policy/1" and doc["require_approval"] and doc["set_by"] == "dpo"
    _call(workspace)  # run 7 arrives: pending
    assert site_main(["runs", "--workspace", ws]) == 0
    out = capsys.readouterr().out
    assert "pending" in out and "oncofed-site approve 7" in out
    assert site_main(["approve", "7", "--workspace", ws, "--by", "Dr. W"]) == 0
    assert "approved by Dr. W" in capsys.readouterr().out
    assert site_main(["runs", "--workspace", ws, "--run", "7"]) == 0
    out = capsys.readouterr().out
    assert "network compact-cnn" in out and "Dr. W: approved" in out
    assert site_main(["runs", "--workspace", ws, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["state"] == "approved"

    def error(code: int) -> str:
        assert code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return " ".join(err.split())

    assert "this site has not seen run 8" in error(site_main(["approve", "8", "--workspace", ws]))
    assert "is not a run id" in error(site_main(["approve", "../x", "--workspace", ws]))
    assert "--tasks 'brain-mr'" in error(site_main(["policy", "--workspace", ws, "--tasks", "brain-mr"]))
    assert "--max-rounds 'ten'" in error(site_main(["policy", "--workspace", ws, "--max-rounds", "ten"]))
    assert "at least 1" in error(site_main(["policy", "--workspace", ws, "--max-rounds", "0"]))
    assert "--why must say why" in error(site_main(["refuse", "7", "--workspace", ws, "--why", " "]))
    assert "does not exist" in error(site_main(["runs", "--workspace", str(workspace / "nope")]))


def test_what_a_failure_sends_passes_the_egress_guard_or_is_replaced() -> None:
    from fl_client.failures import Failure, checked

    odd = ConfigError("run-config key 'task': unknown task 'x\x00\x1b[31m'")  # not printable: not sent as is
    assert failure_of(odd).code == "site-error" and "\x1b" not in failure_of(odd).sentence
    assert failure_of(ConfigError("x" * 500)).sentence == "x" * 200  # cut to the guard's length
    assert checked(Failure("patient-name", "Doe^Jane")).code == "site-error"  # only codes from the fixed lists
    fine = Failure("data-unreadable", "a file the site ingested could not be read: restore it or ingest again")
    assert checked(fine) is fine
