"""Provisioning a consortium: its certificate authority, the SuperLink's TLS certificate, one key pair
per site and a start-up kit for the lead and for each site.

Layout of a provisioned folder (schema ``oncofed.consortium/1``)::

    DIR/consortium.json          sites, fingerprints, the SuperLink address, when each part was made
    DIR/ca/ca.key                the consortium CA's private key (0600): keep it offline
    DIR/ca/ca.crt                the CA certificate every participant trusts
    DIR/server/                  the lead's kit: ca.crt, server.crt, server.key (0600), server.json and
                                 site-keys/<site>.pub (the only SuperNodes the SuperLink accepts)
    DIR/sites/<site>/            one kit per site: ca.crt, site.key (0600), site.pub, site.json,
                                 README.txt and join.sh (the ready command line)

TLS: the SuperLink's certificate is signed by the consortium CA and names ``localhost``,
``127.0.0.1`` and the host names and addresses given at provisioning. SuperNode authentication:
each site holds an EC key on NIST P-384 (Flower refuses ed25519) in OpenSSH format, the format
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.

Adding a site later writes only the new site's kit and the server kit's key list: no file of an
existing site kit changes, so kits already handed out stay valid. Files are created, never
overwritten; private keys are created with mode 0600 and never printed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ProvisionError",
    "Provisioned",
    "SiteKit",
    "add_sites",
    "cert_fingerprint",
    "check_site_id",
    "load_manifest",
    "make_ca",
    "make_server_cert",
    "make_site_keys",
    "parse_site_ids",
    "provision",
    "split_names",
    "ssh_fingerprint",
]

SCHEMA = "oncofed.consortium/1"
MANIFEST = "consortium.json"
DEFAULT_PORT = 9092
CURVE = ec.SECP384R1
CA_DAYS = 3650
SERVER_DAYS = 825
SITE_KEY = "site.key"
SITE_PUB = "site.pub"
_SITE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class ProvisionError(Exception):
    """Provisioning cannot go ahead; the message names the folder, file or site and what to do."""


@dataclass(frozen=True)
class SiteKit:
    """What provisioning made for one site (no secrets)."""

    site_id: str
    folder: Path
    fingerprint: str


@dataclass(frozen=True)
class Provisioned:
    """The result of :func:`provision` or :func:`add_sites`."""

    root: Path
    server_kit: Path
    address: str
    ca_fingerprint: str
    new_sites: tuple[SiteKit, ...]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def check_site_id(site_id: str) -> str:
    """Return ``site_id`` if it is a valid site id.

    Raises:
        ProvisionError: It is not 1–32 lower-case letters, digits or dashes starting with a letter or digit.
    """
    if not _SITE_ID.match(site_id):
        raise ProvisionError(f"site id {site_id!r}: use 1-32 lower-case letters, digits or '-' "
                             "(starting with a letter or digit), e.g. 'a' or 'charite-berlin'")
    return site_id


def parse_site_ids(text: str) -> list[str]:
    """Comma-separated site ids, checked and without duplicates.

    Raises:
        ProvisionError: An id is invalid, repeated, or none is given.
    """
    ids = [s.strip() for s in text.split(",") if s.strip()]
    if not ids:
        raise ProvisionError(f"no site ids in {text!r}: give them comma-separated, e.g. --sites a,b,c")
    for s in ids:
        check_site_id(s)
    dupes = sorted({s for s in ids if ids.count(s) > 1})
    if dupes:
        raise ProvisionError(f"site id {dupes[0]!r} is given twice: each site needs its own id")
    return ids


def split_names(names: Sequence[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Host names for the SuperLink certificate, split into DNS names and IP addresses.

    Raises:
        ProvisionError: A name is neither an IP address nor a valid DNS name.
    """
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        try:
            ips.append(ipaddress.ip_address(name))
            continue
        except ValueError:
            pass
        if not re.match(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]"
                        r"([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$", name):
            raise ProvisionError(f"--names {name!r}: not a DNS name or IP address (e.g. fl.hospital.org or 10.0.0.5)")
        dns.append(name.lower())
    return dns, ips


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate, as colon-separated hex (what ``openssl x509 -fingerprint`` shows)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ssh_fingerprint(public_openssh: bytes) -> str:
    """The OpenSSH ``SHA256:`` fingerprint of a public key line (what ``ssh-keygen -lf`` shows)."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise ProvisionError("not an OpenSSH public key line (expected 'ecdsa-sha2-nistp384 AAAA... comment')")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _write_new(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Create ``path`` with ``data``; never overwrite (the mode is set at creation, before any byte)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ProvisionError(f"{path} already exists: provisioning never overwrites a file; "
                             "move it away or pick a new --out") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def _replace(path: Path, data: bytes) -> None:
    """Atomically replace a (non-secret) bookkeeping file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oncofed consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(*, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new consortium CA: a P-384 key and its self-signed certificate (may sign server certificates only)."""
    key = ec.generate_private_key(CURVE())
    name = _name("oncofed consortium CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, dns_names: Sequence[str],
                     ip_addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address], now: dt.datetime
                     ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and certificate, signed by the CA, valid for the given names and addresses."""
    key = ec.generate_private_key(CURVE())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else "oncofed superlink"))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keys(site_id: str) -> tuple[bytes, bytes]:
    """A site's SuperNode key pair on P-384: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" oncofed-site-{site_id}\n".encode()


def _join_script(site_id: str) -> str:
    return f"""#!/bin/sh
# Join the oncofed consortium as site "{site_id}".
# Usage: ./join.sh WORKSPACE [--superlink HOST:PORT]
#   WORKSPACE is this site's folder made by 'oncofed-site ingest'. Stop with Ctrl-C.
set -eu
KIT="$(cd "$(dirname "$0")" && pwd)"
if [ "$#" -lt 1 ]; then
    echo "usage: $0 WORKSPACE [--superlink HOST:PORT]" >&2
    exit 2
fi
WS="$1"
shift
exec oncofed-site join --kit "$KIT" --workspace "$WS" "$@"
"""


def _readme(site_id: str, address: str, ca_fp: str, key_fp: str) -> str:
    return f"""oncofed start-up kit for site "{site_id}"
{'=' * (31 + len(site_id))}

This folder lets this hospital's computer join the consortium's federated training. Only model
weights and whitelisted metrics leave the site; images and patient data stay in the workspace.

Files
  ca.crt     the consortium's certificate authority: proves the SuperLink is the consortium's
  site.key   this site's private key (mode 0600). Keep it secret; never e-mail or copy it elsewhere.
  site.pub   this site's public key, registered with the consortium lead
  site.json  the site id and the SuperLink address
  join.sh    the command below, ready to run

Join (stays in the foreground; Ctrl-C leaves the consortium):

  oncofed-site join --kit /path/to/this/kit --workspace /path/to/workspace

or

  ./join.sh /path/to/workspace

The workspace is the folder made by 'oncofed-site ingest'. The SuperLink is {address}; if the lead
gives you another address, add --superlink HOST:PORT.

Check with the lead, by phone or in person, that these fingerprints match:
  consortium CA  SHA256 {ca_fp}
  site key       {key_fp}
"""


@dataclass(frozen=True)
class _Consortium:
    root: Path
    manifest: dict[str, Any]

    @property
    def ca_cert_path(self) -> Path:
        return self.root / "ca" / "ca.crt"


def _site_kit(root: Path, site_id: str, *, ca_pem: bytes, address: str, ca_fp: str, now: dt.datetime
              ) -> tuple[SiteKit, bytes]:
    """Write ``root/sites/<site_id>/``; returns the kit and the site's public key line."""
    folder = root / "sites" / site_id
    try:
        folder.mkdir(mode=0o700, parents=False, exist_ok=False)
    except FileExistsError:
        raise ProvisionError(f"{folder} already exists: site {site_id!r} has a kit; pick another site id") from None
    private, public = make_site_keys(site_id)
    fingerprint = ssh_fingerprint(public)
    _write_new(folder / "ca.crt", ca_pem)
    _write_new(folder / SITE_KEY, private, mode=0o600)
    _write_new(folder / SITE_PUB, public)
    site_doc = {"schema": SCHEMA, "site_id": site_id, "superlink": address, "private_key": SITE_KEY,
                "public_key": SITE_PUB, "public_key_fingerprint": fingerprint, "ca_certificate": "ca.crt",
                "ca_sha256": ca_fp, "created": _iso(now)}
    _write_new(folder / "site.json", (json.dumps(site_doc, indent=1) + "\n").encode())
    _write_new(folder / "README.txt", _readme(site_id, address, ca_fp, fingerprint).encode())
    _write_new(folder / "join.sh", _join_script(site_id).encode(), mode=0o755)
    return SiteKit(site_id, folder, fingerprint), public


def _server_doc(address: str, port: int, sites: dict[str, Any]) -> bytes:
    doc = {"schema": SCHEMA, "superlink": address, "port": port, "certificate": "server.crt",
           "private_key": "server.key", "ca_certificate": "ca.crt",
           "sites": {s: {"public_key": f"site-keys/{s}.pub", "fingerprint": m["public_key_fingerprint"]}
                     for s, m in sorted(sites.items())}}
    return (json.dumps(doc, indent=1) + "\n").encode()


def provision(out: Path, sites: Sequence[str], *, names: Sequence[str] = (), port: int = DEFAULT_PORT,
              address: str | None = None) -> Provisioned:
    """Provision a new consortium in ``out`` (which must not hold one yet).

    Args:
        out: The folder to create (or an empty one).
        sites: Site ids, e.g. ``["a", "b", "c"]``.
        names: Extra DNS names or IP addresses of the SuperLink's host for its certificate
            (``localhost`` and ``127.0.0.1`` are always included).
        port: The SuperLink's port, written into the kits.
        address: ``host:port`` the sites connect to (default: the first of ``names``, else
            ``localhost``, with ``port``). Its host must be among the certificate's names.

    Returns:
        Where the kits are, the SuperLink address and the CA fingerprint.

    Raises:
        ProvisionError: ``out`` already holds files, a site id or name is invalid, or the address's
            host is not in the certificate.
    """
    out = Path(out).expanduser().resolve()
    if (out / MANIFEST).exists():
        raise ProvisionError(f"{out} already holds a consortium ({MANIFEST}): add sites with "
                             f"'oncofed-server provision --out {out} --add SITE', or pick a new --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(f"{out} exists and is not an empty folder: pick a new --out")
    site_ids = [check_site_id(s) for s in sites]
    if not site_ids:
        raise ProvisionError("no sites: give --sites a,b,c")
    if len(set(site_ids)) != len(site_ids):
        raise ProvisionError("a site id is given twice: each site needs its own id")
    if not 0 < port < 65536:
        raise ProvisionError(f"--port {port}: must be 1-65535")
    dns, ips = split_names(names)
    dns = list(dict.fromkeys(["localhost", *dns]))
    ips = list(dict.fromkeys([ipaddress.ip_address("127.0.0.1"), *ips]))
    extra = [n.strip() for n in names if n.strip()]
    address = address or f"{extra[0] if extra else 'localhost'}:{port}"
    host = address.rsplit(":", 1)[0].strip("[]")
    if host.lower() not in dns and host not in {str(i) for i in ips}:
        raise ProvisionError(f"--address {address}: host {host!r} is not in the SuperLink certificate; "
                             f"add it to --names (now: {', '.join(dns + [str(i) for i in ips])})")

    now = _now()
    ca_key, ca_cert = make_ca(now=now)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, dns_names=dns, ip_addresses=ips, now=now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    ca_fp = cert_fingerprint(ca_cert)

    out.mkdir(parents=True, exist_ok=True)
    (out / "ca").mkdir(mode=0o700)
    _write_new(out / "ca" / "ca.key", _pem_key(ca_key), mode=0o600)
    _write_new(out / "ca" / "ca.crt", ca_pem)
    server = out / "server"
    server.mkdir(mode=0o700)
    (server / "site-keys").mkdir()
    _write_new(server / "ca.crt", ca_pem)
    _write_new(server / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write_new(server / "server.key", _pem_key(server_key), mode=0o600)
    (out / "sites").mkdir()

    manifest: dict[str, Any] = {
        "schema": SCHEMA, "created": _iso(now), "superlink": {"address": address, "port": port},
        "ca": {"certificate": "ca/ca.crt", "sha256": ca_fp, "not_after": _iso(ca_cert.not_valid_after_utc)},
        "server_certificate": {"certificate": "server/server.crt", "sha256": cert_fingerprint(server_cert),
                               "dns_names": dns, "ip_addresses": [str(i) for i in ips],
                               "not_after": _iso(server_cert.not_valid_after_utc)},
        "sites": {},
    }
    kits = _add_kits(out, manifest, site_ids, ca_pem=ca_pem, now=now)
    return Provisioned(out, server, address, ca_fp, kits)


def _add_kits(root: Path, manifest: dict[str, Any], site_ids: Sequence[str], *, ca_pem: bytes, now: dt.datetime
              ) -> tuple[SiteKit, ...]:
    address = str(manifest["superlink"]["address"])
    ca_fp = str(manifest["ca"]["sha256"])
    kits = []
    for site_id in site_ids:
        kit, public = _site_kit(root, site_id, ca_pem=ca_pem, address=address, ca_fp=ca_fp, now=now)
        _write_new(root / "server" / "site-keys" / f"{site_id}.pub", public)
        manifest["sites"][site_id] = {"kit": f"sites/{site_id}", "public_key": f"server/site-keys/{site_id}.pub",
                                      "public_key_fingerprint": kit.fingerprint, "added": _iso(now)}
        kits.append(kit)
    manifest["updated"] = _iso(now)
    server_json = _server_doc(address, int(manifest["superlink"]["port"]), manifest["sites"])
    _replace(root / "server" / "server.json", server_json)
    _replace(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return tuple(kits)


def load_manifest(root: Path) -> dict[str, Any]:
    """The ``consortium.json`` of a provisioned folder.

    Raises:
        ProvisionError: The folder holds no consortium or its manifest is unreadable.
    """
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ProvisionError(f"{root} holds no consortium ({MANIFEST} missing): provision one first with "
                             f"'oncofed-server provision --out {root} --sites a,b'")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvisionError(f"{path} is not readable JSON ({exc}): restore it from your backup") from None
    if doc.get("schema") != SCHEMA:
        raise ProvisionError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    return dict(doc)


def add_sites(root: Path, sites: Sequence[str]) -> Provisioned:
    """Add sites to a provisioned consortium without touching any existing site kit.

    Writes ``sites/<new>/``, ``server/site-keys/<new>.pub`` and updates ``server/server.json`` and
    ``consortium.json``. A running SuperLink learns the new keys when restarted with
    ``oncofed-server start`` (or at once with ``flwr supernode register``).

    Raises:
        ProvisionError: ``root`` holds no consortium, or a site id is invalid or already provisioned.
    """
    root = Path(root).expanduser().resolve()
    manifest = load_manifest(root)
    ca_path = root / "ca" / "ca.crt"
    if not ca_path.exists():
        raise ProvisionError(f"{ca_path} is missing: restore the consortium's CA folder from your backup")
    for s in sites:
        check_site_id(s)
        if s in manifest["sites"] or (root / "sites" / s).exists():
            raise ProvisionError(f"site {s!r} is already provisioned in {root}; its kit is {root / 'sites' / s}")
    if len(set(sites)) != len(sites):
        raise ProvisionError("a site id is given twice: each site needs its own id")
    ca_pem = ca_path.read_bytes()
    kits = _add_kits(root, manifest, sites, ca_pem=ca_pem, now=_now())
    return Provisioned(root, root / "server", str(manifest["superlink"]["address"]), str(manifest["ca"]["sha256"]),
                       kits)
