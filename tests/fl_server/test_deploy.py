"""A real deployment on loopback: a SuperLink with TLS and SuperNode authentication started from the
provisioned server kit (``oncofed-server start``), three provisioned sites joined from their kits
(one through ``oncofed-site join``, two through the join code), a SuperNode with a key that was never
provisioned (refused), and a 2-round run (``oncofed-server run``) during which one site is killed:
the run still finishes on the two others. Every process is stopped in teardown, even on failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from consortium import make_workspaces

from fl_client.cli import main as site_main
from fl_client.join import JoinError, SiteKit, SuperNode
from fl_server.cli import app_defaults
from fl_server.cli import main as server_main
from fl_server.deploy import READY
from fl_server.flower_ops import APP_FILES, APP_PACKAGES, free_port
from fl_server.provision import make_site_keys, provision
from models.config import from_flat
from models.nets import build_model
from models.weights import load_checkpoint, pack, state_arrays

RUN_CONFIG = {"task": "breast-mg", "num-rounds": 2, "min-sites": 2, "threads": 1, "round-timeout": 150.0}


@dataclass
class Federation:
    root: Path
    env: dict[str, str]
    port: int
    server_kit: Path
    workspaces: Path
    start: subprocess.Popen[str] | None = None
    join_a: subprocess.Popen[str] | None = None
    nodes: dict[str, SuperNode] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    def out(self, name: str) -> Path:
        return self.root / f"{name}.out"

    def cli(self, name: str, module: str, *args: str) -> subprocess.Popen[str]:
        """Start a CLI as a real process (its own session, output to ROOT/NAME.out), with SIGINT ignored as a shell
        leaves it for a command started in the background: Ctrl-C (``kill -INT``) must stop it all the same."""
        def background() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        with open(self.out(name), "w") as fh:
            return subprocess.Popen([sys.executable, "-m", module, *args], stdout=fh, stderr=subprocess.STDOUT,
                                    text=True, env=self.env, start_new_session=True, preexec_fn=background)


def _wait_for(path: Path, text: str, *, timeout: float, process: subprocess.Popen[str] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if process is not None and process.poll() is not None:
            pytest.fail(f"process exited ({process.returncode}) before printing {text!r}:\n{content}")
        time.sleep(0.2)
    pytest.fail(f"{text!r} not in {path} after {timeout:.0f} s:\n{path.read_text() if path.exists() else ''}")


def _interrupt(process: subprocess.Popen[str] | None, timeout: float = 120.0) -> int | None:
    """Ctrl-C for a CLI process; SIGKILL its whole session if it does not stop. The timeout is three times the
    longest clean stop (a site's: 10 s for its executor, then up to 20 s for the SuperNode and 10 s more to kill it),
    which a busy machine can reach: at 30 s a site once failed this under the full suite."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    return process.returncode


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deploy")
    env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200"}
    workspaces = make_workspaces(root, sites=3, studies_per_task=12, seed=0, tasks=["breast-mg"])
    consortium = root / "consortium"
    provision(consortium, ["a", "b", "c"])
    # A kit that looks right (the consortium's CA, site a's id) but holds a key that was never provisioned.
    rogue = root / "rogue-kit"
    shutil.copytree(consortium / "sites" / "a", rogue)
    private, _ = make_site_keys("rogue")
    (rogue / "site.key").write_bytes(private)
    shutil.copytree(workspaces / "site-a", root / "rogue-ws")

    fed = Federation(root, env, free_port(), consortium / "server", workspaces)
    superlink = f"127.0.0.1:{fed.port}"
    try:
        fed.start = fed.cli("start", "fl_server.cli", "start", "--kit", str(fed.server_kit), "--port", str(fed.port),
                            "--state", str(root / "superlink"))
        _wait_for(fed.out("start"), READY, timeout=90, process=fed.start)
        fed.join_a = fed.cli("join-a", "fl_client.cli", "join", "--kit", str(consortium / "sites" / "a"),
                             "--workspace", str(workspaces / "site-a"), "--superlink", superlink)
        for site in "bc":
            kit = SiteKit.load(consortium / "sites" / site)
            fed.nodes[site] = SuperNode(kit, workspaces / f"site-{site}", superlink=superlink).start()
        rogue_run = subprocess.run([sys.executable, "-m", "fl_client.cli", "join", "--kit", str(rogue), "--workspace",
                                    str(root / "rogue-ws"), "--superlink", superlink, "--connect-timeout", "60"],
                                   capture_output=True, text=True, env=env, timeout=120)
        fed.results["rogue"] = rogue_run
        _wait_for(fed.out("join-a"), "joined as SuperNode", timeout=60, process=fed.join_a)
        for node in fed.nodes.values():
            node.wait_connected(timeout=60)
        yield fed
    finally:
        for node in fed.nodes.values():
            node.stop()
        fed.results["join-a-exit"] = _interrupt(fed.join_a)
        fed.results["start-exit"] = _interrupt(fed.start)


@pytest.mark.slow
def test_a_key_that_was_never_provisioned_is_refused(federation: Federation) -> None:
    rogue = federation.results["rogue"]
    assert rogue.returncode == 2, rogue.stdout + rogue.stderr
    assert "Failed to activate SuperNode" in rogue.stderr and "code 2004" in rogue.stderr
    # The refusal names the key actually presented, not the one site a's kit recorded.
    from fl_client.join import key_fingerprint

    presented = key_fingerprint(federation.root / "rogue-kit" / "site.key")
    recorded = json.loads((federation.root / "rogue-kit" / "site.json").read_text())["public_key_fingerprint"]
    joined = " ".join(rogue.stderr.split())
    assert presented in joined and recorded not in joined
    assert "Traceback" not in rogue.stderr
    log = (federation.root / "rogue-ws" / "supernode" / "supernode.log").read_text()
    assert "[code: 2004] Failed to activate SuperNode" in log
    superlink_log = (federation.root / "superlink" / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


@pytest.mark.slow
def test_superlink_serves_tls_with_node_auth_and_registered_the_kit_sites(federation: Federation) -> None:
    start_out = federation.out("start").read_text()
    for site in "abc":
        assert f"site {site}: registered" in start_out
    superlink_log = (federation.root / "superlink" / "superlink.log").read_text()
    assert f"running on https://127.0.0.1:{federation.port}" in superlink_log
    assert "SuperNode authentication is disabled" not in superlink_log
    connection = (federation.root / "superlink" / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in connection and "insecure" not in connection


@pytest.mark.slow
def test_a_second_supernode_on_the_same_workspace_is_refused(federation: Federation) -> None:
    kit = SiteKit.load(federation.server_kit.parent / "sites" / "b")
    twin = SuperNode(kit, federation.workspaces / "site-b", superlink=f"127.0.0.1:{federation.port}")
    with pytest.raises(JoinError, match="another SuperNode already serves workspace"):
        twin.start()
    assert twin.process is None


@pytest.mark.slow
def test_run_finishes_although_a_site_is_killed_during_round_1(federation: Federation,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = federation.root / "run"
    args = ["run", "--kit", str(federation.server_kit), "--state", str(federation.root / "superlink"),
            "--run-dir", str(run_dir)]
    for key, value in RUN_CONFIG.items():
        args += ["--set", f"{key}={value}"]
    t0 = time.monotonic()
    runner = federation.cli("run", "fl_server.cli", *args)
    try:
        victim = federation.nodes["c"]
        deadline = time.monotonic() + 120
        while "Receiving: train message" not in victim.log_text():
            assert runner.poll() is None, federation.out("run").read_text()
            assert time.monotonic() < deadline, "site c never received a training request"
            time.sleep(0.2)
        assert victim.process is not None
        os.killpg(victim.process.pid, signal.SIGKILL)  # a crash: no goodbye to the SuperLink
        code = runner.wait(timeout=300)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    out = federation.out("run").read_text()
    assert code == 0, out
    assert "round   2" in out and "Final global model" in out
    seconds = time.monotonic() - t0
    # The app bundle the SuperLink received (and sends to each site) holds the apps alone, not the checkout.
    installed = list((federation.root / "superlink" / "flwr-home" / "apps").iterdir())
    assert len(installed) == 1 and {p.name for p in installed[0].iterdir()} >= {"fl_client", "pyproject.toml"}
    assert not {p.name for p in installed[0].iterdir()} & {"tests", "scripts", "BENCHMARKS.md"}
    # The bare 'flwr run' that start offers points at a staged copy of the apps, not at the checkout.
    hint = re.search(r"flwr run (\S+) oncofed", federation.out("start").read_text())
    assert hint and {p.name for p in Path(hint.group(1)).iterdir()} == set(APP_FILES + APP_PACKAGES)
    print(f"run with a killed site: {seconds:.0f} s")

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]
    history = json.loads((run_dir / "history.json").read_text())
    zero, first, second = history["rounds"]  # round 0: the initial model, evaluated in round 1's messages
    assert set(zero["evaluate"]) == {"a", "b"}
    assert first["asked_train"] == 3 and second["asked_train"] == 2
    assert len(first["failed"]) == 1 and "Node Unavailable" in first["failed"][0]["reason"]
    assert first["failed"][0]["site"] == "c"  # named by its site id, although it never replied
    assert first["aggregated_sites"] == 2 and set(first["train"]) == {"a", "b"}
    assert second["aggregated_sites"] == 2 and set(second["train"]) == {"a", "b"}
    for record in (first, second):
        assert all(np.isfinite(m["train-loss"]) for m in record["train"].values())
        assert set(record["evaluate"]) == {"a", "b"}
    assert set(history["final"]["sites"]) == {"a", "b"}

    config = from_flat({**app_defaults(), **RUN_CONFIG})
    torch.manual_seed(config.training.seed)
    initial = pack(state_arrays(build_model(config.model)))
    weights = []
    for name in ("round-001.pt", "round-002.pt"):
        arrays, _, _ = load_checkpoint(run_dir / "checkpoints" / name)
        weights.append(arrays["weights"] if "weights" in arrays else pack(arrays))
    assert weights[0].shape == initial.shape
    assert not np.allclose(weights[0], initial) and not np.allclose(weights[1], weights[0])
    # The data summary was asked of the three sites before round 1 (site c was still there).
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())
    assert {r["site"] for r in summary["tasks"][RUN_CONFIG["task"]]["sites"]} == {"a", "b", "c"}
    # The lead's live status, from Flower's own API: sites by their site id, the run, its last round.
    capsys.readouterr()
    assert server_main(["status", "--kit", str(federation.server_kit), "--state", str(federation.root / "superlink"),
                        "--run-dir", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    by_site = {s["site"]: s["status"] for s in status["sites"]}
    assert by_site["a"] == by_site["b"] == "online" and by_site["c"] != "online"
    assert any(r["status"].startswith("finished") for r in status["runs"])
    assert status["current"]["rounds_done"] == 2 and status["current"]["answered"] == ["a", "b"]
    # Stopping a run that does not exist is Flower's refusal in one line.
    assert server_main(["stop", "987654", "--kit", str(federation.server_kit), "--state",
                        str(federation.root / "superlink")]) == 2
    assert "flwr stop" in capsys.readouterr().err
    # Both surviving sites logged what they sent: two trainings, two evaluations and the final evaluation.
    for site in "ab":
        egress = (federation.workspaces / f"site-{site}" / "egress.jsonl").read_text().splitlines()
        assert len(egress) >= 5, f"site {site}'s egress log: {egress}"


@pytest.mark.slow
def test_ctrl_c_stops_site_and_superlink_cleanly(federation: Federation) -> None:
    assert _interrupt(federation.join_a) == 0
    assert "left the consortium" in federation.out("join-a").read_text()
    assert _interrupt(federation.start) == 0
    assert "SuperLink stopped." in federation.out("start").read_text()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", federation.port), timeout=1).close()


def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provision(tmp_path / "consortium", ["a"])
    kit, server_kit = tmp_path / "consortium" / "sites" / "a", tmp_path / "consortium" / "server"
    workspace = tmp_path / "ws"
    workspace.mkdir()

    def error(code: int) -> str:
        assert code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return " ".join(err.split())

    assert "not a server kit" in error(server_main(["start", "--kit", str(tmp_path)]))
    assert "no SuperLink was started" in error(server_main(["run", "--kit", str(server_kit), "--run-dir",
                                                             str(tmp_path / "run"), "--set", "task=breast-mg"]))
    assert "not a site start-up kit" in error(site_main(["join", "--kit", str(tmp_path), "--workspace",
                                                         str(workspace)]))
    assert "holds no site catalog" in error(site_main(["join", "--kit", str(kit), "--workspace", str(workspace)]))
    (kit / "site.key").chmod(0o644)
    assert "chmod 600" in error(site_main(["join", "--kit", str(kit), "--workspace", str(workspace)]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert "uses the port" in error(server_main(["start", "--kit", str(server_kit), "--port", str(port),
                                                     "--state", str(tmp_path / "state")]))
