"""Running Flower's own processes for the consortium: a SuperLink we start and stop ourselves, the
``flwr`` CLI's connection file, and ``flwr run`` of this project's apps.

Why our own SuperLink: ``flwr run`` without one starts a detached SuperLink that outlives the run and
installs the app's dependencies with ``uv`` on every run (a CUDA torch build, gigabytes). Ours runs
with ``--disable-runtime-dependency-installation`` in the current environment, on a free loopback
port, and is stopped when the job ends. ``FLWR_HOME`` points into the job's folder so nothing is
written to the user's home.
"""

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
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fl_server

__all__ = [
    "CONNECTION",
    "FlowerError",
    "RunOutcome",
    "SuperLink",
    "app_dir",
    "ensure_executables",
    "flower_env",
    "flwr_run",
    "free_port",
    "run_config_arg",
    "run_failure_details",
    "simulate",
    "stage_app",
    "wait_for_port",
    "write_connection",
]

CONNECTION = "oncofed"


class FlowerError(RuntimeError):
    """A Flower process failed; the message says which and where its log is."""


def app_dir() -> Path:
    """The folder holding this project's ``pyproject.toml`` with the ``[tool.flwr.app]`` section."""
    root = Path(fl_server.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise FlowerError(f"{root} holds no pyproject.toml: run from a source checkout (pip install -e .)")
    return root


#: What the app bundle holds: the project file and the four packages, nothing else of the checkout.
APP_FILES = ("pyproject.toml", "README.md")
APP_PACKAGES = ("fl_server", "fl_client", "models", "imaging")


def stage_app(dest: Path) -> Path:
    """Copy the app's own files (:data:`APP_FILES`, :data:`APP_PACKAGES` without caches) into ``dest``, the folder
    ``flwr run`` bundles; return ``dest``.

    ``flwr run .`` walks the whole checkout and bundles every ``*.py``, ``*.json``, ``*.jsonl``, ``*.md``,
    ``*.toml`` and ``*.yaml`` that ``.gitignore`` does not exclude: a lead's ``runs/`` folder in the checkout
    (histories, data summaries, model cards) would be sent to every site with the next run, and the walk of
    ``.venv`` and old run outputs cost 4-40 s per run.

    Raises:
        FlowerError: The source checkout lacks one of the app's files.
        FileExistsError: ``dest`` exists (it must be new, so that nothing else goes into the bundle).
    """
    src = app_dir()
    dest.mkdir(parents=True)
    for name in APP_FILES + APP_PACKAGES:
        if not (src / name).exists():
            raise FlowerError(f"{src / name} is missing: run from a complete source checkout (pip install -e .)")
        if name in APP_PACKAGES:
            shutil.copytree(src / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src / name, dest / name)
    return dest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's commands: a private FLWR_HOME, no telemetry, no update check; and OpenMP threads
    that sleep when idle (``OMP_WAIT_POLICY=PASSIVE`` unless set), since simulated sites share the machine's cores
    and spinning threads of one site's torch starve another's (two trainings on 2 cores: 41 s each against 14 s)."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_connection(flwr_home: Path, *, address: str, root_certificates: Path | None = None) -> None:
    """Write ``FLWR_HOME/config.toml`` with one connection, ``oncofed``, made the default.

    Args:
        flwr_home: The private Flower home.
        address: The SuperLink's ``host:port``.
        root_certificates: The consortium CA certificate (TLS); None for an insecure loopback link.
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_value(address)}"]
    if root_certificates is not None:
        lines.append(f"root-certificates = {_toml_value(str(Path(root_certificates).resolve()))}")
    else:
        lines.append("insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def wait_for_port(host: str, port: int, *, timeout: float, process: subprocess.Popen[Any] | None = None,
                  log: Path | None = None) -> None:
    """Wait until something accepts connections on ``host:port``.

    Raises:
        FlowerError: The process died or the port stayed closed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise FlowerError(f"the process exited with code {process.returncode} before listening on {host}:{port}"
                              + (f"; its log: {log}" if log else ""))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerError(f"nothing listens on {host}:{port} after {timeout:.0f} s" + (f"; log: {log}" if log else ""))


@dataclass
class SuperLink:
    """A ``flower-superlink`` process we own.

    Args:
        workdir: Folder for its log, database and FLWR_HOME.
        port: Its port (default: a free one).
        simulation: Run the simulation runtime (virtual SuperNodes) instead of waiting for real ones.
        tls: ``(certfile, keyfile, ca_certfile)`` for HTTPS; None for ``--insecure`` (loopback only).
        enable_supernode_auth: Only SuperNodes whose public keys were registered may connect.
        host: The interface to listen on.
    """

    workdir: Path
    port: int = 0
    simulation: bool = True
    tls: tuple[Path, Path, Path] | None = None
    enable_supernode_auth: bool = False
    host: str = "127.0.0.1"
    process: subprocess.Popen[Any] | None = field(default=None, init=False)

    @property
    def address(self) -> str:
        """``host:port`` the SuperLink listens on."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The SuperLink's log file."""
        return self.workdir / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        """The ``FLWR_HOME`` folder the SuperLink runs with."""
        return self.workdir / "flwr-home"

    def command(self) -> list[str]:
        """The ``flower-superlink`` command line for these settings."""
        cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", self.host, "--port", str(self.port),
               "--database", str(self.workdir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.simulation:
            cmd.append("--simulation")
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cert, key, ca = self.tls
            cmd += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certfile", str(ca)]
        if self.enable_supernode_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def start(self, *, timeout: float = 60.0) -> SuperLink:
        """Start the SuperLink (on a free port unless ``port`` was given) and wait until it listens.

        Args:
            timeout: Seconds to wait for it to listen.

        Returns:
            This SuperLink, started.

        Raises:
            FlowerError: It exited, or did not listen within ``timeout`` seconds (the message names its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it until stop()
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        env=flower_env(self.flwr_home), start_new_session=True)
        log.close()
        wait_for_port(self.host, self.port, timeout=timeout, process=self.process, log=self.log_path)
        return self

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (ServerApp, simulation workers)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> SuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_FINISHED = re.compile(r"oncofed: finished; (global model (\S+), report (\S+)|data summary (\S+))")


@dataclass(frozen=True)
class RunOutcome:
    """What ``flwr run`` printed and whether our ServerApp said it finished."""

    returncode: int
    output: str
    finished: bool


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``--run-config`` text for ``flwr run`` (TOML values)."""
    return " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())


def flwr_run(flwr_home: Path, *, run_config: Mapping[str, Any], app: Path | None = None,
             federation_config: Mapping[str, Any] | None = None, on_line: Callable[[str], None] | None = None,
             timeout: float = 3600.0, extra_env: Mapping[str, str] | None = None) -> RunOutcome:
    """``flwr run APP oncofed --stream`` with the run config; streams each output line to ``on_line``. Without
    ``app``, the bundle is this project's apps alone (:func:`stage_app`)."""
    if app is None:
        with tempfile.TemporaryDirectory(prefix="oncofed-app-") as stage:
            return flwr_run(flwr_home, run_config=run_config, app=stage_app(Path(stage) / "oncofed"),
                            federation_config=federation_config, on_line=on_line, timeout=timeout,
                            extra_env=extra_env)
    cmd: list[str] = [str(Path(sys.executable).parent / "flwr"), "run", str(app), CONNECTION, "--stream"]
    if run_config:
        cmd += ["--run-config", run_config_arg(run_config)]
    if federation_config:
        cmd += ["--federation-config", run_config_arg(federation_config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=flower_env(flwr_home, extra_env), bufsize=1)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    finished = False
    for line in proc.stdout:
        lines.append(line)
        if _FINISHED.search(line):
            finished = True
        if on_line is not None:
            on_line(line.rstrip("\n"))
        if time.monotonic() > deadline:
            proc.kill()
            break
        if finished:
            # The stream stays open a moment after the run ends; our ServerApp has said it is done.
            break
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not finished:
        why = run_failure_details(flwr_home, "".join(lines))
        if why:
            lines.append(why + "\n")
    return RunOutcome(proc.returncode if proc.returncode is not None else -1, "".join(lines), finished)


_STARTED = re.compile(r"Successfully started run (\d+)")


def run_failure_details(flwr_home: Path, output: str) -> str:
    """Flower's own status of the run ``output`` started (``flwr list --run-id``), for a run that ended without our
    ServerApp saying so: e.g. ``finished:failed`` with why (the ServerApp process never started, sent no
    heartbeat, ...). Empty when no run was started or Flower cannot be asked."""
    m = _STARTED.search(output)
    if m is None:
        return ""
    cmd = [str(Path(sys.executable).parent / "flwr"), "list", CONNECTION, "--run-id", m.group(1), "--format", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(flwr_home), timeout=60)
        runs = json.loads(done.stdout[done.stdout.find("{"):]).get("runs", [])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ""
    if not runs:
        return ""
    run = runs[0]
    return f"oncofed: Flower says run {m.group(1)} is {run.get('status')}: {run.get('status-details') or 'no details'}"


def simulate(sites_dir: Path, run_dir: Path, run_config: Mapping[str, Any], *, workdir: Path | None = None,
             cpus_per_site: int = 1, on_line: Callable[[str], None] | None = None,
             timeout: float = 3600.0) -> RunOutcome:
    """A Flower simulation of the consortium on this machine: one virtual site per workspace folder.

    Starts our own SuperLink in simulation mode, runs this project's apps with ``flwr run`` (each
    virtual site trains on its own workspace under ``sites_dir``), and stops the SuperLink.

    Args:
        sites_dir: A folder whose sub-folders are site workspaces (ingested).
        run_dir: The run directory the ServerApp writes (checkpoints, history, report).
        run_config: Run-config values (``task``, ``num-rounds``, ...).
        workdir: Where the SuperLink keeps its log and Flower home (default: next to ``run_dir``).
        cpus_per_site: CPUs Flower reserves per virtual site (sites run in parallel when this leaves room).
        on_line: Receives every line of the run's log as it streams.

    Raises:
        FlowerError: No site workspaces, or the SuperLink did not start.
    """
    sites_dir, run_dir = Path(sites_dir).resolve(), Path(run_dir).resolve()
    sites = sorted(p for p in sites_dir.iterdir() if p.is_dir()) if sites_dir.is_dir() else []
    if not sites:
        raise FlowerError(f"{sites_dir} holds no site workspaces: make one folder per site (oncofed-site ingest)")
    workdir = Path(workdir or run_dir.with_name(run_dir.name + ".flower")).resolve()
    ensure_executables(["flower-superlink", "flwr"])
    with SuperLink(workdir, simulation=True) as link:
        write_connection(link.flwr_home, address=link.address)
        config = {**run_config, "sim-sites": str(sites_dir), "run-dir": str(run_dir)}
        federation = {"num-supernodes": len(sites), "client-resources-num-cpus": cpus_per_site}
        return flwr_run(link.flwr_home, run_config=config, federation_config=federation, on_line=on_line,
                        timeout=timeout)


def ensure_executables(names: Sequence[str]) -> None:
    """Raise unless Flower's commands are installed next to this Python."""
    missing = [n for n in names if not (Path(sys.executable).parent / n).exists()]
    if missing:
        raise FlowerError(f"{', '.join(missing)} not found next to {sys.executable}: install oncofed with its "
                          "dependencies (make demo does)")
