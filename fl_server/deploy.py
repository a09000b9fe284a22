"""The consortium lead's SuperLink in deployment: TLS with the consortium's certificate, SuperNode
authentication with the provisioned site keys, and ``flwr run`` of this project's apps against it.

``start`` runs ``flower-superlink`` with ``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile`` and
``--enable-supernode-auth``, then registers every public key of the server kit's ``site-keys/``
through the Control API (``flwr supernode register``; Flower 1.41 no longer takes a key list at
start: ``--auth-list-public-keys`` exits with an error). Only those sites can connect.

The SuperLink's state (its database, log and the lead's Flower home with the ``oncofed``
connection) lives in a state folder, by default ``KIT/superlink/``. The database is started afresh
at every start, so the registered keys are always exactly the kit's: to revoke a site, delete its
``site-keys/<site>.pub`` and restart. A run's own record (checkpoints, history) is in its run
directory and resumes across restarts.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fl_server.flower_ops import (
    CONNECTION,
    FlowerError,
    RunOutcome,
    SuperLink,
    ensure_executables,
    flower_env,
    flwr_run,
    wait_for_port,
    write_connection,
)

__all__ = [
    "READY",
    "DeployError",
    "Deployment",
    "ServerKit",
    "connection_home",
    "local_address",
    "register_site",
    "run",
    "serve",
    "start",
    "state_dir_for",
]

STATE_DIR = "superlink"
READY = "oncofed: SuperLink ready at"


class DeployError(Exception):
    """The SuperLink cannot be started or used; the message names the kit, file or address and what to do."""


@dataclass(frozen=True)
class ServerKit:
    """The lead's kit folder made by ``oncofed-server provision`` (``DIR/server``).

    Attributes:
        folder: The kit folder.
        certificate: The SuperLink's TLS certificate (signed by the consortium CA).
        private_key: Its private key.
        ca_certificate: The consortium CA certificate.
        port: The port written into the sites' kits.
        address: The ``host:port`` the sites were told to connect to.
        site_keys: Each site's public key file (OpenSSH), by site id.
        dns_names: The DNS names in the certificate.
        ip_addresses: The IP addresses in the certificate.
    """

    folder: Path
    certificate: Path
    private_key: Path
    ca_certificate: Path
    port: int
    address: str
    site_keys: dict[str, Path]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]

    @classmethod
    def load(cls, folder: Path) -> ServerKit:
        """Read and check the kit.

        Raises:
            DeployError: A file is missing or the kit holds no site key.
        """
        from cryptography import x509

        folder = Path(folder).expanduser().resolve()
        meta = folder / "server.json"
        if not meta.is_file():
            raise DeployError(f"{folder} is not a server kit (no server.json): pass DIR/server of a folder made by "
                              "'oncofed-server provision --out DIR --sites a,b'")
        try:
            doc: dict[str, Any] = json.loads(meta.read_text())
            port, address = int(doc["port"]), str(doc["superlink"])
        except (OSError, ValueError, KeyError) as exc:
            raise DeployError(f"{meta} is damaged ({exc!r}): restore the server kit from the provisioning folder") \
                from None
        paths = {k: folder / str(doc.get(k, default)) for k, default in
                 (("certificate", "server.crt"), ("private_key", "server.key"), ("ca_certificate", "ca.crt"))}
        for key, path in paths.items():
            if not path.is_file():
                raise DeployError(f"{path} is missing: the server kit needs its {key.replace('_', ' ')}; restore it "
                                  "from the provisioning folder")
        keys = {p.stem: p for p in sorted((folder / "site-keys").glob("*.pub"))}
        if not keys:
            raise DeployError(f"{folder / 'site-keys'} holds no site public key: no site could connect; add sites with "
                              "'oncofed-server provision --out DIR --add SITE'")
        try:
            cert = x509.load_pem_x509_certificate(paths["certificate"].read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (ValueError, x509.ExtensionNotFound) as exc:
            raise DeployError(f"{paths['certificate']} is not a usable server certificate ({exc}): provision again")\
                from None
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
        return cls(folder, paths["certificate"], paths["private_key"], paths["ca_certificate"], port, address, keys,
                   dns, ips)

    def names(self) -> set[str]:
        """Every host name or address the certificate is valid for."""
        return {*(n.lower() for n in self.dns_names), *self.ip_addresses}


def local_address(kit: ServerKit, host: str, port: int) -> str:
    """The address the lead's own tools use to reach a SuperLink bound to ``host``.

    Raises:
        DeployError: ``host`` is a specific address the certificate does not name.
    """
    if host in ("0.0.0.0", "::", ""):
        return f"127.0.0.1:{port}"
    if host.lower() not in kit.names():
        raise DeployError(f"--host {host} is not in the SuperLink certificate ({', '.join(sorted(kit.names()))}): "
                          "use one of those, --host 0.0.0.0 to accept sites on every interface, or provision "
                          "again with --names")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def register_site(flwr_home: Path, site_id: str, public_key: Path) -> str:
    """Register one site's public key with the running SuperLink (idempotent).

    Returns:
        The SuperNode id Flower gave it, or ``"already registered"``.

    Raises:
        DeployError: The key was refused (wrong format or curve) or the SuperLink did not answer.
    """
    cmd = [str(Path(sys.executable).parent / "flwr"), "supernode", "register", str(public_key), CONNECTION,
           "--name", f"site-{site_id}", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(flwr_home), timeout=120)
    out = done.stdout + done.stderr
    if done.returncode == 0:
        found = re.search(r'"node-id":\s*"?(\d+)', done.stdout)
        return found.group(1) if found else "registered"
    if "already in use" in out:
        return "already registered"
    raise DeployError(f"the SuperLink refused the public key of site {site_id!r} ({public_key}): "
                      f"{' '.join(out.split())[-400:]}")


@dataclass
class Deployment:
    """A started SuperLink with the kit's sites registered.

    Attributes:
        kit: The server kit.
        link: The SuperLink process.
        address: The address the lead's tools use (``flwr`` connection ``oncofed``).
        registered: Site id to SuperNode id.
    """

    kit: ServerKit
    link: SuperLink
    address: str
    registered: dict[str, str]
    lock: IO[str] | None = None

    @property
    def flwr_home(self) -> Path:
        """The SuperLink's ``FLWR_HOME``, where the ``flwr`` connection the lead's tools use is written."""
        return self.link.flwr_home

    def stop(self) -> None:
        """Stop the SuperLink and release its state folder for the next start."""
        self.link.stop()
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _lock_state(workdir: Path) -> IO[str]:
    """One SuperLink per state folder (a second start would wipe the first one's database)."""
    lock = open(workdir / "superlink.lock", "a+")  # noqa: SIM115 - held until Deployment.stop()
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DeployError(f"a SuperLink started from {workdir} is already running: stop it (Ctrl-C in its "
                          "terminal) or pass another --state") from None
    return lock


def state_dir_for(kit: ServerKit, state: Path | None) -> Path:
    """The SuperLink's state folder: ``state`` or ``KIT/superlink``."""
    return Path(state).expanduser().resolve() if state else kit.folder / STATE_DIR


def start(kit: ServerKit, *, state: Path | None = None, host: str = "127.0.0.1", port: int = 0,
          on_site: Callable[[str, str], None] | None = None, timeout: float = 60.0) -> Deployment:
    """Start the SuperLink with TLS and SuperNode authentication and register the kit's sites.

    Args:
        kit: The server kit.
        state: The state folder (default ``KIT/superlink``).
        host: The interface to listen on (``0.0.0.0`` for all).
        port: The port (default: the kit's).
        on_site: Called with (site id, SuperNode id) after each registration.
        timeout: Seconds to wait for the SuperLink to listen.

    Raises:
        DeployError: The SuperLink did not start, or a key was refused (the SuperLink is stopped then).
    """
    try:
        ensure_executables(["flower-superlink", "flwr"])
    except FlowerError as exc:
        raise DeployError(str(exc)) from None
    port = port or kit.port
    address = local_address(kit, host, port)
    _check_port_free(host, port)
    workdir = state_dir_for(kit, state)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = _lock_state(workdir)
    for name in ("superlink.db", "superlink.db-wal", "superlink.db-shm"):
        # A fresh state: the registered keys are exactly the kit's (a removed key is revoked).
        (workdir / name).unlink(missing_ok=True)
    (workdir / "flwr-home" / "config.toml").unlink(missing_ok=True)
    link = SuperLink(workdir, port=port, simulation=False, host=host,
                     tls=(kit.certificate, kit.private_key, kit.ca_certificate), enable_supernode_auth=True)
    deployment = Deployment(kit, link, address, {}, lock)
    try:
        try:
            link.start(timeout=timeout)
        except FlowerError as exc:
            raise DeployError(f"flower-superlink did not start: {exc}\n{_tail(link.log_path)}") from None
        write_connection(link.flwr_home, address=address, root_certificates=kit.ca_certificate)
        for site_id, key in kit.site_keys.items():
            deployment.registered[site_id] = register_site(link.flwr_home, site_id, key)
            if on_site is not None:
                on_site(site_id, deployment.registered[site_id])
        # Node id -> site id, for the lead's status (Flower's node listing does not show the names).
        (workdir / "sites.json").write_text(json.dumps(
            {node: site for site, node in deployment.registered.items() if node.isdigit()}, indent=1))
    except BaseException:
        deployment.stop()
        raise
    return deployment


def _check_port_free(host: str, port: int) -> None:
    """Raise unless ``host:port`` can be bound (else we might talk to whatever already listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise DeployError(f"cannot listen on {host}:{port} ({exc.strerror}): another program (or SuperLink) "
                              "uses the port; stop it or pass --port") from None


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def serve(kit_dir: Path, *, state: Path | None = None, host: str = "127.0.0.1", port: int = 0,
          say: Callable[[str], None] = print) -> int:
    """Run the SuperLink in the foreground until Ctrl-C (or SIGTERM), then stop it cleanly.

    Raises:
        DeployError: The kit is unusable, the SuperLink did not start or stopped on its own.
    """
    kit = ServerKit.load(kit_dir)

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C too, explicitly: a process started in the background by a shell (or a service manager) may inherit
    # SIGINT ignored, and Python then installs no KeyboardInterrupt of its own; `kill -INT` must still stop it.
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    deployment: Deployment | None = None
    try:
        say(f"Starting the SuperLink on {host}:{port or kit.port} with TLS and SuperNode authentication "
            f"({len(kit.site_keys)} provisioned sites)")
        deployment = start(kit, state=state, host=host, port=port,
                           on_site=lambda s, n: say(f"  site {s}: registered (SuperNode {n})"))
        link = deployment.link
        home = deployment.flwr_home
        say(f"{READY} {link.address} (lead's connection: {deployment.address}); sites connect to "
            f"{kit.address if host not in ('127.0.0.1', 'localhost') else deployment.address}")
        say(f"Log: {link.log_path}\n"
            "Start a run from another terminal:\n"
            f"  oncofed-server run --kit {kit.folder} --run-dir runs/fed-1 --set task=breast-mg --set num-rounds=3\n"
            f"{_flwr_hint(home)}"
            "Ctrl-C stops the SuperLink.")
        assert link.process is not None
        while link.process.poll() is None:
            time.sleep(0.5)
        raise DeployError(f"flower-superlink stopped on its own (exit code {link.process.returncode}); last lines "
                          f"of {link.log_path}:\n{_tail(link.log_path)}")
    except KeyboardInterrupt:
        if deployment is not None:
            deployment.stop()
        say("SuperLink stopped.")
        return 0
    finally:
        if deployment is not None:
            deployment.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


APP_STAGE = "oncofed-app"


def _flwr_hint(home: Path) -> str:
    """The lines for a bare ``flwr run``, on the app's own files staged in ``<state>/oncofed-app`` (not the
    checkout, whose other files Flower would bundle too: :func:`fl_server.flower_ops.stage_app`); a snapshot of the
    code as it is now. Empty when no folder could be staged: then only ``oncofed-server run`` is offered."""
    from fl_server.flower_ops import APP_FILES, APP_PACKAGES, stage_app

    stage = home.parent / APP_STAGE
    try:
        ours = set(APP_FILES + APP_PACKAGES)
        if stage.is_symlink() or (stage.exists() and {p.name for p in stage.iterdir()} != ours):
            return ""  # not a folder this command staged: left alone
        if stage.exists():
            shutil.rmtree(stage)
        stage_app(stage)
    except (FlowerError, OSError):
        return ""
    return ("or with Flower's CLI (the apps as they are now, staged in their own folder):\n"
            f"  FLWR_HOME={home} flwr run {stage} {CONNECTION} --stream --run-config 'task=\"breast-mg\"'\n")


def connection_home(kit_dir: Path, state: Path | None = None) -> Path:
    """The lead's Flower home written by :func:`start`, checked to point at a listening SuperLink.

    Raises:
        DeployError: No SuperLink was started from this kit, or it is not listening any more.
    """
    import tomllib

    kit = ServerKit.load(kit_dir)
    home = state_dir_for(kit, state) / "flwr-home"
    config = home / "config.toml"
    if not config.is_file():
        raise DeployError(f"no SuperLink was started from {kit.folder} ({config} missing): run "
                          f"'oncofed-server start --kit {kit.folder}' first, in another terminal")
    address = str(tomllib.loads(config.read_text())["superlink"][CONNECTION]["address"])
    host, _, port = address.rpartition(":")
    try:
        wait_for_port(host.strip("[]"), int(port), timeout=3)
    except FlowerError:
        raise DeployError(f"the SuperLink at {address} is not running: start it with "
                          f"'oncofed-server start --kit {kit.folder}'") from None
    return home


def run(kit_dir: Path, run_config: Mapping[str, Any], *, state: Path | None = None,
        on_line: Callable[[str], None] | None = None, timeout: float = 7 * 86400.0,
        extra_env: Mapping[str, str] | None = None) -> RunOutcome:
    """``flwr run`` of this project's apps on the kit's running SuperLink, streaming its log.

    Raises:
        DeployError: The SuperLink is not running.
    """
    home = connection_home(kit_dir, state)
    return flwr_run(home, run_config=run_config, on_line=on_line, timeout=timeout, extra_env=extra_env)
