"""Provisioning: the consortium CA, the SuperLink's certificate, site keys in the formats Flower reads,
start-up kits, adding a site without touching existing kits, and refusing to overwrite."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from fl_server.cli import main as server_main
from fl_server.provision import ProvisionError, add_sites, cert_fingerprint, provision, ssh_fingerprint

# Flower's CLI module (imported to check our keys with its own loader) imports typer, which warns about click.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:typer.*")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prov") / "consortium"
    provision(root, ["a", "b", "c"], names=["fl.example.org", "10.1.2.3"])
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_modes(consortium: Path) -> None:
    assert sorted(p.name for p in (consortium / "sites").iterdir()) == ["a", "b", "c"]
    for site in "abc":
        kit = consortium / "sites" / site
        assert sorted(p.name for p in kit.iterdir()) == ["README.txt", "ca.crt", "join.sh", "site.json", "site.key",
                                                          "site.pub"]
        assert stat.S_IMODE((kit / "site.key").stat().st_mode) == 0o600
        assert (kit / "join.sh").stat().st_mode & stat.S_IXUSR
        assert (kit / "ca.crt").read_bytes() == (consortium / "ca" / "ca.crt").read_bytes()
        doc = json.loads((kit / "site.json").read_text())
        assert doc["site_id"] == site and doc["superlink"] == "fl.example.org:9092"
        readme = (kit / "README.txt").read_text()
        assert "oncofed-site join --kit" in readme and doc["public_key_fingerprint"] in readme
        assert "PRIVATE KEY" not in readme
    server = consortium / "server"
    assert {p.name for p in server.iterdir()} >= {"ca.crt", "server.crt", "server.key", "server.json", "site-keys"}
    assert stat.S_IMODE((server / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((consortium / "ca" / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in (server / "site-keys").iterdir()) == ["a.pub", "b.pub", "c.pub"]
    for site in "abc":
        assert (server / "site-keys" / f"{site}.pub").read_bytes() == \
            (consortium / "sites" / site / "site.pub").read_bytes()


def test_site_keys_are_p384_in_the_formats_flower_reads(consortium: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    manifest = json.loads((consortium / "consortium.json").read_text())
    for site in "abc":
        kit = consortium / "sites" / site
        # What flower-supernode --auth-supernode-private-key does with the file:
        private = serialization.load_ssh_private_key((kit / "site.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        # What flwr supernode register does with the public key file (it exits on a bad key or curve):
        registered = try_load_public_key(kit / "site.pub")
        assert registered == public_key_to_bytes(private.public_key())
        fingerprint = ssh_fingerprint((kit / "site.pub").read_bytes())
        assert manifest["sites"][site]["public_key_fingerprint"] == fingerprint
        assert fingerprint.startswith("SHA256:") and len(fingerprint) == 50
        # The site computes the same fingerprint from the key it presents (what it shows when refused).
        from fl_client.join import key_fingerprint

        assert key_fingerprint(kit / "site.key") == fingerprint
    keys = {(consortium / "sites" / s / "site.pub").read_bytes().split()[1] for s in "abc"}
    assert len(keys) == 3


def test_server_certificate_names_and_chain(consortium: Path) -> None:
    ca = x509.load_pem_x509_certificate((consortium / "ca" / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((consortium / "server" / "server.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.1.2.3")}
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("localhost"))
    assert verifier.verify(cert, [])[-1] == ca
    ip_verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    ip_verifier.verify(cert, [])
    manifest = json.loads((consortium / "consortium.json").read_text())
    assert manifest["ca"]["sha256"] == cert_fingerprint(ca)
    assert manifest["server_certificate"]["sha256"] == cert_fingerprint(cert)


def test_tls_handshake_with_the_kits(consortium: Path) -> None:
    """A real TLS connection on loopback: server cert + key from the server kit, CA from a site kit."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(consortium / "server" / "server.crt", consortium / "server" / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(consortium / "sites" / "a" / "ca.crt"))
    for name in ("localhost", "127.0.0.1"):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)

            def serve(listener: socket.socket = listener) -> None:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
            thread.join(timeout=5)


def test_adding_a_site_leaves_existing_kits_byte_identical(tmp_path: Path) -> None:
    root = tmp_path / "consortium"
    provision(root, ["a", "b"])
    before_sites, before_ca = _hashes(root / "sites"), _hashes(root / "ca")
    before_server = _hashes(root / "server")
    done = add_sites(root, ["d"])
    assert [k.site_id for k in done.new_sites] == ["d"]
    after_sites = _hashes(root / "sites")
    assert {k: v for k, v in after_sites.items() if not k.startswith("d/")} == before_sites
    assert sorted(k for k in after_sites if k.startswith("d/")) == [
        "d/README.txt", "d/ca.crt", "d/join.sh", "d/site.json", "d/site.key", "d/site.pub"]
    assert _hashes(root / "ca") == before_ca
    after_server = _hashes(root / "server")
    changed = {k for k in after_server if before_server.get(k) != after_server[k]}
    assert changed == {"site-keys/d.pub", "server.json"}
    assert set(json.loads((root / "server" / "server.json").read_text())["sites"]) == {"a", "b", "d"}
    assert set(json.loads((root / "consortium.json").read_text())["sites"]) == {"a", "b", "d"}
    with pytest.raises(ProvisionError, match="'a' is already provisioned"):
        add_sites(root, ["a"])
    assert _hashes(root / "sites") == after_sites


def test_refuses_to_overwrite_and_bad_input(tmp_path: Path) -> None:
    root = tmp_path / "consortium"
    provision(root, ["a"])
    before = _hashes(root)
    with pytest.raises(ProvisionError, match="already holds a consortium.*--add"):
        provision(root, ["a", "b"])
    assert _hashes(root) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ProvisionError, match="not an empty folder"):
        provision(tmp_path / "other", ["a"])
    with pytest.raises(ProvisionError, match="site id 'A B'"):
        provision(tmp_path / "new", ["A B"])
    with pytest.raises(ProvisionError, match="not in the SuperLink certificate"):
        provision(tmp_path / "new2", ["a"], address="fl.example.org:9092")
    with pytest.raises(ProvisionError, match="holds no consortium"):
        add_sites(tmp_path / "missing", ["z"])


def test_cli_provision_add_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "consortium"
    assert server_main(["provision", "--out", str(out), "--sites", "a,b"]) == 0
    printed = capsys.readouterr().out
    assert "SHA256:" in printed and str(out / "server") in printed
    keys = [(out / "sites" / s / "site.key").read_text() for s in "ab"] + [(out / "server" / "server.key").read_text()]
    body = [line for k in keys for line in k.splitlines() if "PRIVATE KEY" not in line]
    assert not any(line in printed for line in body)
    assert server_main(["provision", "--out", str(out), "--sites", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "already holds a consortium" in err and "Traceback" not in err
    assert server_main(["provision", "--out", str(out), "--add", "c"]) == 0
    assert (out / "sites" / "c" / "site.key").exists()
    assert server_main(["provision", "--out", str(out), "--sites", "a,a"]) == 2
    assert "given twice" in capsys.readouterr().err
