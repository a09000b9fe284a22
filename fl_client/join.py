"""Joining the consortium: a Flower SuperNode for this site, started from the site's start-up kit.

The kit (made by the consortium lead with ``oncofed-server provision``) holds the consortium's CA
certificate, this site's private key and ``site.json`` (site id, SuperLink address). The SuperNode:

- verifies the SuperLink's certificate against the kit's CA (``--root-certificates``);
- proves the site's identity with its key (``--auth-supernode-private-key``): the SuperLink accepts
  only keys the lead registered, and refuses others with ``[code: 2004] Failed to activate SuperNode``;
- tells our ClientApp where the site's workspace is (``--node-config 'workspace="..." site-id="..."'``);
- serves its local runtime API on a free loopback port, so several sites can run on one host;
- runs with ``--isolation process``: Flower starts nothing per message. Our executor
  (:mod:`fl_client.executor`, started beside it) serves every message with the oncofed this site
  installed, from a warm process, after checking the run's app bundle; nothing the lead sends is
  installed or imported here. Only the executor can take the SuperNode's tasks: they share a secret
  (``superexec.secret``, mode 0600, new at every start).

Its log (the SuperNode's and the executor's lines), the secret and Flower home live in
``WORKSPACE/supernode/``. This module imports nothing from the server side: the small process helpers
it needs are here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_client.workspace import Workspace

__all__ = [
    "JoinError",
    "SiteKit",
    "SuperNode",
    "check_address",
    "check_placement",
    "check_workspace",
    "explain_exit",
    "flower_env",
    "free_port",
    "join",
    "key_fingerprint",
    "node_config_arg",
]

ACTIVATION_REFUSED = "Failed to activate SuperNode"
_CONNECTED = "SuperNode ID:"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class JoinError(Exception):
    """The site cannot join; the message names the kit, file or address and what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: a private FLWR_HOME, no telemetry or update check, and this
    Python's ``bin`` first on PATH (the SuperNode starts ``flower-superexec`` by name)."""
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def node_config_arg(workspace: Path, site_id: str, *, device: str = "auto", precision: str = "auto") -> str:
    """The ``--node-config`` text our ClientApp reads (see ``fl_client.federated.site_from_config``)."""
    return (f"workspace={_toml_string(str(workspace))} site-id={_toml_string(site_id)} "
            f"device={_toml_string(device)} precision={_toml_string(precision)}")


@dataclass(frozen=True)
class SiteKit:
    """A site's start-up kit folder.

    Attributes:
        folder: The kit folder.
        site_id: This site's id in the consortium.
        superlink: The SuperLink's ``host:port`` the lead wrote into the kit.
        private_key: The site's private key (OpenSSH format, EC P-384).
        ca_certificate: The consortium CA certificate.
        fingerprint: The ``SHA256:`` fingerprint of the key the site presents (computed from its private key,
            not copied from ``site.json``: a replaced key shows as what it is).
    """

    folder: Path
    site_id: str
    superlink: str
    private_key: Path
    ca_certificate: Path
    fingerprint: str

    @classmethod
    def load(cls, folder: Path) -> SiteKit:
        """Read and check a kit folder.

        Raises:
            JoinError: A file is missing or unreadable, or the private key is readable by others.
        """
        folder = Path(folder).expanduser().resolve()
        meta = folder / "site.json"
        if not meta.is_file():
            raise JoinError(f"{folder} is not a site start-up kit (no site.json): pass the folder the consortium "
                            "lead sent you (it holds ca.crt, site.key, site.json)")
        try:
            doc: dict[str, Any] = json.loads(meta.read_text())
            site_id, superlink = str(doc["site_id"]), str(doc["superlink"])
            key = folder / str(doc.get("private_key", "site.key"))
            ca = folder / str(doc.get("ca_certificate", "ca.crt"))
        except (OSError, ValueError, KeyError) as exc:
            raise JoinError(f"{meta} is damaged ({exc!r}): ask the consortium lead for a new copy of the kit") from None
        for path, what in ((key, "private key"), (ca, "CA certificate")):
            if not path.is_file():
                raise JoinError(f"{path} is missing: the kit's {what} is needed; restore the kit folder "
                                "as the lead sent it")
        mode = key.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise JoinError(f"{key} can be read by other users (mode {stat.filemode(mode)}): "
                            f"run 'chmod 600 {key}' and check who copied it")
        return cls(folder, site_id, superlink, key, ca, key_fingerprint(key))


def key_fingerprint(private_key: Path) -> str:
    """The OpenSSH ``SHA256:`` fingerprint of the public half of a private key file (what ``ssh-keygen -lf``
    shows), or a note that the key cannot be read."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (OSError, ValueError, TypeError, AttributeError):
        return "(unreadable key)"
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_workspace(workspace: Path) -> Path:
    """The absolute workspace folder, if it holds an ingested site catalog.

    Raises:
        JoinError: The folder or its catalog is missing.
    """
    ws = Path(workspace).expanduser().resolve()
    if not Workspace(ws).catalog.is_file():
        raise JoinError(f"workspace {ws} holds no site catalog ({Workspace(ws).catalog.name}): ingest this site's "
                        "DICOM first "
                        f"(oncofed-site ingest --workspace {workspace} --source DIR --labels CSV)")
    return ws


def check_placement(device: str, precision: str) -> str:
    """``device`` and ``precision`` in words (``cuda:0 bf16``), checked on this machine before the site joins.

    Raises:
        JoinError: The device does not exist here or cannot run that precision (one line, with what there is).
    """
    from models.device import DeviceError, place

    try:
        return place(device, precision).describe()
    except DeviceError as exc:
        raise JoinError(f"--device/--precision: {exc}") from None


def check_address(address: str) -> str:
    """``address`` if it looks like ``host:port``.

    Raises:
        JoinError: It does not.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise JoinError(f"--superlink {address!r}: expected HOST:PORT, e.g. fl.hospital.org:9092")
    return address


@dataclass
class SuperNode:
    """A ``flower-supernode`` process for one site, owned by us.

    Args:
        kit: The site's start-up kit.
        workspace: The site's workspace folder (absolute).
        superlink: ``host:port`` of the SuperLink (default: the kit's).
        port: The SuperNode's local runtime API port on 127.0.0.1 (default: a free one).
        extra_env: Extra environment variables for the SuperNode and the ClientApps it starts.
        device: Where the site runs models (auto, cpu, cuda, cuda:N).
        precision: The arithmetic precision (auto, fp32, bf16, fp16).
    """

    kit: SiteKit
    workspace: Path
    superlink: str = ""
    port: int = 0
    extra_env: Mapping[str, str] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    executor: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_offset: int = field(default=0, init=False)
    _lock: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # The SuperNode and the executor run in the state folder: every path they get is absolute.
        self.workspace = Path(self.workspace).expanduser().resolve()

    @property
    def state_dir(self) -> Path:
        """The folder the SuperNode and the executor keep their state in while the site is joined."""
        return Workspace.of(self.workspace).supernode

    @property
    def log_path(self) -> Path:
        """The SuperNode's log file."""
        return self.state_dir / "supernode.log"

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink to connect to: ``superlink`` if given, else the kit's."""
        return self.superlink or self.kit.superlink

    @property
    def secret_path(self) -> Path:
        """The file holding the SuperExec secret that only the SuperNode and this site's executor share."""
        return self.state_dir / "superexec.secret"

    def command(self) -> list[str]:
        """The ``flower-supernode`` command line: TLS, the site's key, its node config, process isolation."""
        return [str(Path(sys.executable).parent / "flower-supernode"),
                "--superlink", self.address,
                "--root-certificates", str(self.kit.ca_certificate),
                "--auth-supernode-private-key", str(self.kit.private_key),
                "--node-config", node_config_arg(self.workspace, self.kit.site_id, device=self.device,
                                                 precision=self.precision),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--isolation", "process", "--superexec-auth-secret-file", str(self.secret_path)]

    def executor_command(self, supernode_pid: int) -> list[str]:
        """The command line of the site's executor (:mod:`fl_client.executor`) for this SuperNode.

        Args:
            supernode_pid: The SuperNode's process id; the executor exits when that process is gone.
        """
        return [sys.executable, "-m", "fl_client.executor", "--runtime-api", f"127.0.0.1:{self.port}",
                "--secret-file", str(self.secret_path), "--supernode-pid", str(supernode_pid)]

    def _write_secret(self) -> None:
        self.secret_path.unlink(missing_ok=True)
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)

    def start(self) -> SuperNode:
        """Start the SuperNode (returns at once; see :meth:`wait_connected`)."""
        exe = Path(sys.executable).parent / "flower-supernode"
        if not exe.exists():
            raise JoinError(f"flower-supernode not found next to {sys.executable}: install oncofed with its "
                            "dependencies (pip install -e .)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.port = self.port or free_port()
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._write_secret()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the processes own it until stop()
        env = flower_env(self.state_dir / "flwr-home", self.extra_env)
        try:
            # The SuperNode and the executor hold the workspace lock too: it stays taken while they run.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.state_dir,
                                            env=env, start_new_session=True, pass_fds=(self._lock.fileno(),))
            self.executor = subprocess.Popen(self.executor_command(self.process.pid), stdout=log,
                                             stderr=subprocess.STDOUT, cwd=self.state_dir, env=env,
                                             start_new_session=True, pass_fds=(self._lock.fileno(),))
        except OSError:
            self.stop()
            raise
        finally:
            log.close()
        return self

    def _take_lock(self) -> None:
        """One SuperNode per workspace: a second one would train on the same patients twice."""
        lock = open(self.state_dir / "supernode.lock", "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip()
            lock.close()
            raise JoinError(f"another SuperNode already serves workspace {self.workspace} ({owner or 'unknown'}): "
                            "stop it first; a site joins once") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"site {self.kit.site_id}, process {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def log_text(self) -> str:
        """What this SuperNode has logged since it was started."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")

    def wait_connected(self, *, timeout: float) -> str:
        """Wait until the SuperLink has accepted this site; returns the node id.

        Raises:
            JoinError: The SuperLink refused the site's key, the process exited, or time ran out.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            for line in text.splitlines():
                if _CONNECTED in line:
                    return line.split(_CONNECTED, 1)[1].strip()
            if self.process is not None and self.process.poll() is not None:
                raise JoinError(explain_exit(self, self.process.returncode, text))
            self.check_executor()
            time.sleep(0.2)
        raise JoinError(f"the SuperLink at {self.address} did not accept site {self.kit.site_id!r} within "
                        f"{timeout:.0f} s: check the address and that the lead's SuperLink runs; log: {self.log_path}")

    def stop(self, *, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Stop the SuperNode and the executor; the SuperNode tells the SuperLink it leaves. Returns its exit code."""
        if self.executor is not None:
            # The executor first: a task it serves ends with it (the SuperLink sees the site leave next).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.executor.pid, signal.SIGKILL)
            self.executor.wait(timeout=10)
        if self.process is None:
            self._release_lock()
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # ClientApps or the runtime helper may outlive the SuperNode for a moment: end the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._release_lock()
        return self.process.returncode

    def check_executor(self) -> None:
        """Raise if the executor has stopped (no message of the site's could be served then).

        Raises:
            JoinError: With the last lines of the log.
        """
        if self.executor is not None and self.executor.poll() is not None:
            tail = "\n".join(self.log_text().strip().splitlines()[-5:])
            raise JoinError(f"the site's executor stopped (exit code {self.executor.returncode}); last lines of "
                            f"{self.log_path}:\n{tail}")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> SuperNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def explain_exit(node: SuperNode, code: int, log_text: str) -> str:
    """A one-paragraph reason why a SuperNode exited, with what to do."""
    if ACTIVATION_REFUSED in log_text or "code: 2004" in log_text:
        return (f"the SuperLink at {node.address} refused site {node.kit.site_id!r} "
                f"(code 2004, {ACTIVATION_REFUSED}): its key is not registered there, or another SuperNode "
                "with this key is already connected. "
                f"Ask the lead to check that site key {node.kit.fingerprint} is in the server kit and restart "
                f"'oncofed-server start'; log: {node.log_path}")
    if "Unable to parse the private key" in log_text:
        return f"flower-supernode cannot read {node.kit.private_key}: ask the lead for a new kit; log: {node.log_path}"
    tail = "\n".join(log_text.strip().splitlines()[-5:])
    return f"flower-supernode exited with code {code}; last lines of {node.log_path}:\n{tail}"


def _progress(line: str) -> str | None:
    """A short line for the console from a SuperNode log line, or None to keep it quiet."""
    if "Receiving:" in line and "message" in line:
        return line.split("Receiving:", 1)[1].split("(")[0].strip().replace(" message", " request") + " received"
    if "Sent successfully" in line:
        return "reply sent (weights and whitelisted metrics only)"
    if line.startswith("oncofed-executor: "):
        return line.removeprefix("oncofed-executor: ")
    if "ERROR" in line:
        return line
    return None


def join(kit_dir: Path, workspace: Path, *, superlink: str | None = None, say: Callable[[str], None] = print,
         connect_timeout: float = 0.0, device: str = "auto", precision: str = "auto") -> int:
    """Run this site's SuperNode in the foreground until Ctrl-C (or SIGTERM); then leave cleanly.

    Args:
        kit_dir: The site's start-up kit folder.
        workspace: The site's workspace (ingested).
        superlink: ``host:port`` of the SuperLink, overriding the kit's.
        say: Receives each progress line for the user.
        connect_timeout: Give up if the SuperLink has not accepted the site after this many seconds
            (0: keep trying; Flower retries while the SuperLink is unreachable).
        device: Where the site runs models (auto: the first CUDA device, else the CPU).
        precision: Arithmetic precision (auto: bf16/fp16 mixed precision on a GPU, fp32 on the CPU).

    Returns:
        0 after a clean stop.

    Raises:
        JoinError: The kit or workspace is unusable, or the SuperNode stopped on its own (refused key,
            unreadable key, ...).
    """
    kit = SiteKit.load(kit_dir)
    ws = check_workspace(workspace)
    placement = check_placement(device, precision)
    node = SuperNode(kit, ws, superlink=check_address(superlink) if superlink else "", device=device,
                     precision=precision)
    check_address(node.address)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C too, explicitly: a process started in the background by a shell (or a service manager) may inherit
    # SIGINT ignored, and Python then installs no KeyboardInterrupt of its own; `kill -INT` must still stop it.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    node.start()
    say(f"site {kit.site_id}: connecting to the SuperLink at {node.address} (TLS, site key {kit.fingerprint}); "
        f"workspace {ws}; models on {placement}; log {node.log_path}")
    try:
        node_id = node.wait_connected(timeout=connect_timeout or 10 * 365 * 86400.0)
        say(f"site {kit.site_id}: joined as SuperNode {node_id}; waiting for training rounds (Ctrl-C to leave)")
        seen = len(node.log_text())
        while node.process is not None and node.process.poll() is None:
            node.check_executor()
            time.sleep(0.5)
            chunk = node.log_text()[seen:]
            complete = chunk.rfind("\n") + 1
            for line in chunk[:complete].splitlines():
                if (msg := _progress(_ANSI.sub("", line))) is not None:
                    say(f"site {kit.site_id}: {msg}")
            seen += complete
        assert node.process is not None
        raise JoinError(explain_exit(node, node.process.returncode, node.log_text()))
    except KeyboardInterrupt:
        node.stop()
        say(f"site {kit.site_id}: left the consortium (SuperNode stopped)")
        return 0
    finally:
        node.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
