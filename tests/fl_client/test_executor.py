"""The hospital decides what runs on its data, in a real loopback deployment: a TLS SuperLink with site
authentication started from the provisioned kit, two sites joined with ``--isolation process`` and the
site's own executor, and runs launched by the lead with ``flwr run`` on app folders the lead controls:

- a lead whose checkout has a modified ClientApp (writes a marker into the site workspace, adds a key
  to the reply): the marker never appears, the replies are the genuine ones, and each site's egress log
  holds exactly what the server received;
- a lead whose app says another version: every message is refused with the reason the lead sees;
- a run outside one site's policy, while the other site approves runs by hand: refused before any
  training, and pending, approved, then trained, with each step in the audit log;
- a task that fails (a study folder moved away after ingest) and a task process killed outright: failed
  replies with PHI-free reasons, and the next round at that site trains in the same warm executor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from consortium import make_workspaces

from fl_client.egress import EgressLog
from fl_client.executor import installed_app
from fl_client.join import SiteKit, SuperNode
from fl_client.policy import RunBook, RunState, SitePolicy
from fl_client.workspace import Workspace
from fl_server.deploy import Deployment, ServerKit, connection_home, start
from fl_server.flower_ops import flwr_run, free_port, stage_app
from fl_server.provision import provision
from models.protocol import Refusal

pytestmark = pytest.mark.slow

# The data summary before round 1 is tested in test_deploy and test_simulation; here the messages are the rounds'.
BASE = {"task": "breast-mg", "min-sites": 2, "threads": 1, "round-timeout": 120.0, "data-summary": False}
TAMPERED = '''

# --- the lead's edit: run at the site, write there, and send more than the site allows ---------------
_genuine_inputs, _genuine_reply = _inputs, _reply


def _inputs(msg, context):  # noqa: F811
    out = _genuine_inputs(msg, context)
    (out[0].workspace / "LEAD_CODE_RAN").write_text("the lead's code ran here")
    return out


def _reply(msg, reply):  # noqa: F811
    message = _genuine_reply(msg, reply)
    message.content["metrics"]["patient-count-secret"] = 42.0
    return message
'''


@dataclass
class Consortium:
    root: Path
    deployment: Deployment
    kit: Path
    state: Path
    workspaces: Path
    nodes: dict[str, SuperNode] = field(default_factory=dict)

    def app_copy(self, name: str, *, version: str | None = None, tampered: bool = False) -> Path:
        """A copy of the project as a lead could edit it (the app folder ``flwr run`` bundles)."""
        dst = stage_app(self.root / "apps" / name)
        if version is not None:
            toml = dst / "pyproject.toml"
            toml.write_text(re.sub(r'^version = "[^"]+"', f'version = "{version}"', toml.read_text(), count=1,
                                   flags=re.MULTILINE))
        if tampered:
            with open(dst / "fl_client" / "app.py", "a") as fh:
                fh.write(TAMPERED)
        return dst

    def run(self, name: str, app: Path | None = None, *, beside: Callable[[], None] | None = None,
            **config: Any) -> dict[str, Any]:
        """``flwr run`` of ``app`` (default: the staged apps, ``stage_app``) on the SuperLink; ``beside`` runs in a
        thread meanwhile (what a site's staff or a failure does during the run)."""
        run_dir = self.root / "runs" / name
        side = threading.Thread(target=beside) if beside is not None else None
        if side is not None:
            side.start()
        try:
            outcome = flwr_run(connection_home(self.kit, self.state), app=app,
                               run_config={**BASE, **config, "run-dir": str(run_dir)}, timeout=600)
        finally:
            if side is not None:
                side.join(timeout=310)
        if not outcome.finished:  # what Flower's SuperLink logged says why (e.g. the ServerApp never started)
            link_log = self.deployment.link.log_path.read_text(errors="replace").splitlines()[-40:]
            raise AssertionError(outcome.output[-3000:] + "\n--- superlink log ---\n" + "\n".join(link_log))
        history: dict[str, Any] = json.loads((run_dir / "history.json").read_text())
        return history


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("site-control")
    workspaces = make_workspaces(root, sites=2, studies_per_task=10, seed=4, tasks=["breast-mg"])
    provision(root / "consortium", ["a", "b"])
    kit = root / "consortium" / "server"
    port = free_port()
    deployment = start(ServerKit.load(kit), state=root / "superlink", port=port)
    fed = Consortium(root, deployment, kit, root / "superlink", workspaces)
    try:
        for site in "ab":
            fed.nodes[site] = SuperNode(SiteKit.load(root / "consortium" / "sites" / site), workspaces / f"site-{site}",
                                        superlink=f"127.0.0.1:{port}").start()
        for node in fed.nodes.values():
            node.wait_connected(timeout=90)
        yield fed
    finally:
        for node in fed.nodes.values():
            node.stop()
        deployment.stop()


def _round(history: dict[str, Any], number: int) -> dict[str, Any]:
    (record,) = [r for r in history["rounds"] if r["round"] == number]
    return record


def _egress(fed: Consortium, site: str, run: str) -> list[Any]:
    return [r for r in EgressLog(fed.workspaces / f"site-{site}").records() if r.run == run]


def test_a_lead_edited_clientapp_never_runs_at_the_site(consortium: Consortium) -> None:
    fed = consortium
    history = fed.run("tampered", fed.app_copy("tampered", tampered=True), **{"num-rounds": 2})
    for site in "ab":
        ws = fed.workspaces / f"site-{site}"
        assert not (ws / "LEAD_CODE_RAN").exists(), "the lead's ClientApp ran at the site"
        for record in history["rounds"][1:]:
            metrics = record["train"][f"{site}"]
            assert "patient-count-secret" not in metrics and metrics["num-examples"] > 0
            # What the server recorded is what the site's egress log says it sent.
            sent = [r for r in _egress(fed, site, history["run_id"])
                    if r.kind == "train" and r.round == record["round"]]
            assert len(sent) == 1
            assert {k: metrics[k] for k in sent[0].metrics} == pytest.approx(sent[0].metrics)
        # The site recorded which bundle the lead sent, and that its own code answered.
        runs = RunBook(ws).runs()
        assert len(runs) == 1 and runs[0].manifest.app == installed_app() and len(runs[0].manifest.app_hash) == 64
        log = (ws / "supernode" / "supernode.log").read_text()
        assert "oncofed-executor: serving tasks with" in log
        assert not (ws / "supernode" / "flwr-home" / "apps").exists() or not any(
            (ws / "supernode" / "flwr-home" / "apps").iterdir()), "the app bundle was installed at the site"
    assert history["final"]["sites"].keys() == {"a", "b"}


def test_a_run_built_with_another_version_is_refused_with_the_reason(consortium: Consortium) -> None:
    fed = consortium
    history = fed.run("version", fed.app_copy("v040", version="0.4.0"), **{"num-rounds": 1})
    # No site evaluated the initial model either: round 1 is the only round on record.
    (record,) = history["rounds"]
    assert record["aggregated_sites"] == 0 and not any(m.get("num-examples") for m in record["train"].values())
    reasons = {r["site"]: (r["code"], r["reason"]) for r in record["refused"]}
    mine = installed_app().split("==")[1]
    assert reasons == {s: (Refusal.VERSION, f"site {s} runs oncofed {mine}; this run was built with 0.4.0")
                       for s in "ab"}
    assert {r["site"] for r in history["final"]["refused"]} == {"a", "b"}
    report = (fed.root / "runs" / "version" / "report.html").read_text()
    assert "this run was built with 0.4.0" in report
    for site in "ab":
        assert [r.kind for r in _egress(fed, site, history["run_id"])] == ["train-refused", "evaluate-refused"]


def test_policy_refusal_and_approval_in_a_live_run(consortium: Consortium) -> None:
    fed = consortium
    book_a, book_b = RunBook(fed.workspaces / "site-a"), RunBook(fed.workspaces / "site-b")
    book_a.set_policy(SitePolicy(tasks=("lung-ct", "prostate-mr")), who="site a DPO")
    book_b.set_policy(SitePolicy(require_approval=True), who="site b DPO")
    approved: dict[str, Any] = {}

    def approve_when_pending() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            pending = [r for r in book_b.runs() if r.state == RunState.PENDING]
            if pending:
                approved["record"] = book_b.decide(pending[0].run, RunState.APPROVED, who="Dr. B")
                return
            time.sleep(0.05)

    try:
        history = fed.run("policy", beside=approve_when_pending, **{"num-rounds": 3, "min-sites": 1})
    finally:
        book_a.set_policy(SitePolicy(), who="site a DPO")
        book_b.set_policy(SitePolicy(), who="site b DPO")
    first, second, third = (_round(history, n) for n in (1, 2, 3))
    refused = {r["site"]: r for r in first["refused"]}
    assert refused["a"]["code"] == Refusal.TASK and "not breast-mg" in refused["a"]["reason"]
    assert refused["b"]["code"] == Refusal.PENDING
    assert first["aggregated_sites"] == 0
    for record in (second, third):  # approved after round 1: site b trains from the next message on
        assert [r["site"] for r in record["refused"]] == ["a"]
        assert record["aggregated_sites"] == 1 and record["train"]["b"]["num-examples"] > 0
    run = approved["record"].run
    assert book_a.get(run).state == RunState.REFUSED  # type: ignore[union-attr]
    assert book_b.get(run).state == RunState.FINISHED  # type: ignore[union-attr]
    # Site a never trained for the run: only refusals left it.
    assert {r.kind for r in _egress(fed, "a", history["run_id"])} == {"train-refused", "evaluate-refused"}
    trail = [(e["who"], e["action"]) for e in book_b.audit() if e["run"] in ("", run)]
    assert trail[-4:] == [("site b DPO", "policy-set"), ("site policy", "run-seen (pending)"), ("Dr. B", "approved"),
                          ("site b DPO", "policy-set")]
    assert [e["action"] for e in book_a.audit() if e["run"] == run] == ["run-seen (refused)"]


def _task_children(node: SuperNode) -> list[int]:
    assert node.executor is not None
    return [int(p) for p in Path(f"/proc/{node.executor.pid}/task/{node.executor.pid}/children").read_text().split()]


def _next_task_child(node: SuperNode, timeout: float = 120.0) -> int:
    """The pid of the executor's next task process (a forked child), as soon as it starts."""
    deadline = time.monotonic() + timeout
    while _task_children(node) and time.monotonic() < deadline:  # the task before it finishes first
        time.sleep(0.005)
    while time.monotonic() < deadline:
        if pids := _task_children(node):
            return pids[0]
        time.sleep(0.005)
    raise AssertionError("the executor started no task process")


def test_failed_and_killed_tasks_leave_phi_free_reasons_and_the_next_round_trains(consortium: Consortium) -> None:
    fed = consortium
    node = fed.nodes["a"]
    assert node.executor is not None
    executor_pid = node.executor.pid
    dicom = fed.root / "data" / "site-a" / "dicom"
    hidden = dicom.with_name("dicom-moved-away")
    dicom.rename(hidden)  # as if the hospital's export folder were moved after ingest
    events: dict[str, Any] = {}

    def break_rounds() -> None:
        deadline = time.monotonic() + 300
        ws = fed.workspaces / "site-a"
        while time.monotonic() < deadline and not any(r.kind == "error" for r in EgressLog(ws).records()):
            time.sleep(0.05)
        hidden.rename(dicom)  # round 1 failed: the folder is back for round 2
        child = _next_task_child(node)  # round 2's task process at site a: killed outright
        os.kill(child, signal.SIGKILL)
        events["killed"] = child

    try:
        history = fed.run("crash", beside=break_rounds, **{"num-rounds": 3, "min-sites": 1})
    finally:
        if hidden.exists():
            hidden.rename(dicom)
    text = json.dumps(history)
    assert str(fed.root) not in text and "dicom-moved-away" not in text and "No such file" not in text
    first, second, third = (_round(history, n) for n in (1, 2, 3))
    failed = {f["site"]: f["reason"] for f in first["failed"]}
    assert failed["a"].startswith("oncofed site a: data-unreadable: ")
    assert second["failed"][0]["site"] == "a" and "oncofed site a: task-crashed:" in second["failed"][0]["reason"]
    assert "signal 9" in second["failed"][0]["reason"]
    assert third["train"]["a"]["num-examples"] > 0 and third["aggregated_sites"] == 2  # the same warm executor
    assert node.executor.poll() is None and node.executor.pid == executor_pid
    errors = [r for r in _egress(fed, "a", history["run_id"]) if r.kind == "error"]
    assert [e.strings["reason"] for e in errors] == ["data-unreadable", "task-crashed"]
    details = Workspace(fed.workspaces / "site-a").error_log.read_text()
    assert "FileNotFoundError" in details and str(dicom) in details  # the details stay in the site's error log
    log = (fed.workspaces / "site-a" / "supernode" / "supernode.log").read_text()
    assert "the task process died (signal 9); failed reply sent" in log
