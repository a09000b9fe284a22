"""Can a decode be trusted (``imaging.integrity``)? Damaged codestreams are rejected before their pixels are used,
real files from other encoders pass, and DICOM digital signatures written by DCMTK's ``dcmsign`` are verified
the way ``dcmsign --verify`` verifies them: intact files pass, a file changed in one pixel byte is rejected."""

from __future__ import annotations

import datetime
import struct
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import system_tool
from dicom_factory import write_series
from pydicom.encaps import encapsulate, generate_frames

from imaging.catalog import Catalog
from imaging.dicom import decode_pixels
from imaging.errors import DicomError, Reason
from imaging.ingest import ingest_folder
from imaging.integrity import CodestreamError, check_codestream, verify_signatures
from imaging.summary import series_listing


def _check(ds: pydicom.Dataset) -> None:
    check_codestream(ds, rows=ds.Rows, cols=ds.Columns, samples=int(ds.get("SamplesPerPixel", 1)),
                     bits_allocated=ds.BitsAllocated, n_frames=int(ds.get("NumberOfFrames", 1) or 1))


def test_compressed_files_from_other_encoders_pass_the_structure_check(pydicom_files: Path) -> None:
    checked, decoded = 0, 0
    for path in sorted(pydicom_files.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            syntax = ds.file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - pydicom ships deliberately broken files too
            continue
        if "PixelData" not in ds or not syntax.is_encapsulated:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.pixel_array  # noqa: B018 - only files some decoder here reads are judged
        except Exception:  # noqa: BLE001
            continue
        decoded += 1
        _check(ds)  # every file a decoder reads is structurally sound: no false alarm
        checked += 1
    assert checked == decoded >= 20


def _first_frame(ds: pydicom.Dataset) -> bytearray:
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _tile_length_short(frame: bytearray) -> bytearray:
    at = frame.find(b"\xff\x90")
    frame[at + 6: at + 10] = struct.pack(">I", struct.unpack(">I", frame[at + 6: at + 10])[0] - 100)
    return frame


def _sof_width(frame: bytearray) -> bytearray:
    at = frame.find(b"\xff\xf7")
    frame[at + 7: at + 9] = struct.pack(">H", 32)
    return frame


def _rle_segments(frame: bytearray) -> bytearray:
    frame[0] = 3
    return frame


DAMAGE: dict[str, tuple[str, Callable[[bytearray], bytearray], str]] = {
    "j2k-cut-in-half": ("MR_small_jp2klossless.dcm", lambda f: f[: len(f) // 2], "runs past the codestream"),
    "j2k-tile-length": ("MR_small_jp2klossless.dcm", _tile_length_short, "expected a tile-part"),
    "j2k-no-end-marker": ("MR_small_jp2klossless.dcm", lambda f: f[: f.rfind(b"\xff\xd9")], "runs past"),
    "jpeg-ls-cut": ("MR_small_jpeg_ls_lossless.dcm", lambda f: f[: len(f) // 2], "without an end-of-image"),
    "jpeg-ls-spliced-tail": ("MR_small_jpeg_ls_lossless.dcm", lambda f: f + b"\x00" * 64, "follow the end-of-image"),
    "jpeg-ls-width": ("MR_small_jpeg_ls_lossless.dcm", _sof_width, "holds 32x64 pixels"),
    "rle-header-cut": ("MR_small_RLE.dcm", lambda f: f[:40], "header is cut short"),
    "rle-segments": ("MR_small_RLE.dcm", _rle_segments, "3 RLE segment(s)"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_codestream_is_rejected_with_its_reason(tmp_path: Path, pydicom_files: Path, name: str) -> None:
    source, damage, words = DAMAGE[name]
    ds = pydicom.dcmread(pydicom_files / source)
    ds.PixelData = encapsulate([bytes(damage(_first_frame(ds)))])
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    with pytest.raises(DicomError) as caught:
        decode_pixels(path)
    assert caught.value.reason == Reason.CORRUPT_CODESTREAM and words in caught.value.message
    assert str(pydicom_files) not in caught.value.message  # the sentence names no path


def test_a_frame_count_other_than_declared_is_rejected(pydicom_files: Path) -> None:
    ds = pydicom.dcmread(pydicom_files / "MR_small_RLE.dcm")
    frame = bytes(_first_frame(ds))
    ds.PixelData, ds.NumberOfFrames = encapsulate([frame, frame]), 3
    with pytest.raises(CodestreamError, match="holds 2 frame"):
        _check(ds)


# ------------------------------------------------------------------------------------------- signatures


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """An RSA and an ECDSA key, each with a self-signed certificate, as PEM files for ``dcmsign``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("signers")
    out = {}
    keys = (("rsa", rsa.generate_private_key(65537, 2048)), ("ecdsa", ec.generate_private_key(ec.SECP256R1())))
    for kind, key in keys:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"site a PACS ({kind})")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
        key_pem, cert_pem = folder / f"{kind}.key.pem", folder / f"{kind}.cert.pem"
        key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[kind] = (key_pem, cert_pem)
    return out


def _sign(source: Path, target: Path, signer: tuple[Path, Path], *mac: str) -> None:
    subprocess.run([system_tool("dcmsign"), "--sign", str(signer[0]), str(signer[1]), *mac, str(source), str(target)],
                   check=True, capture_output=True, timeout=60)


def _dcmsign_accepts(path: Path) -> bool:
    done = subprocess.run([system_tool("dcmsign"), "--verify", str(path)], capture_output=True, text=True, timeout=60)
    return "signature is OK" in done.stdout + done.stderr


def _flip_a_pixel_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"\xe0\x7f\x10\x00") + 64  # inside the pixel data, past its tag, length and first items
    raw[at] ^= 0x40
    path.write_bytes(raw)


SIGNED = [  # (test file, signer, MAC option): the ways DCMTK signs, over the syntaxes a site receives
    ("CT_small.dcm", "rsa", "--mac-sha256"),
    ("MR_small_jp2klossless.dcm", "rsa", "--mac-sha256"),
    ("MR_small_jpeg_ls_lossless.dcm", "rsa", "--mac-ripemd160"),
    ("MR_small_RLE.dcm", "ecdsa", "--mac-sha384"),
    ("rtplan.dcm", "rsa", "--mac-sha1"),  # implicit VR with nested sequences
]


@pytest.mark.parametrize(("source", "signer", "mac"), SIGNED, ids=[s[0] for s in SIGNED])
def test_signatures_written_by_dcmsign_verify_and_a_changed_byte_fails_as_with_dcmsign(
        tmp_path: Path, pydicom_files: Path, signers: dict[str, tuple[Path, Path]], source: str, signer: str,
        mac: str) -> None:
    signed = tmp_path / "signed.dcm"
    _sign(pydicom_files / source, signed, signers[signer], mac)
    check = verify_signatures(pydicom.dcmread(signed))
    assert check.verified == 1 and check.unverifiable == 0
    assert check.covers_pixels == (source != "rtplan.dcm") and _dcmsign_accepts(signed)
    if source == "rtplan.dcm":
        raw = signed.read_bytes().replace(b"Plan1", b"Plan2", 1)  # a signed text value changed
        signed.write_bytes(raw)
    else:
        _flip_a_pixel_byte(signed)
    assert not _dcmsign_accepts(signed)
    with pytest.raises(ValueError, match="does not match the file's content"):
        verify_signatures(pydicom.dcmread(signed))


def test_ingest_rejects_a_signed_series_changed_after_signing_and_keeps_the_intact_one(
        tmp_path: Path, signers: dict[str, tuple[Path, Path]]) -> None:
    src = tmp_path / "dicom"
    intact, _, intact_uid = write_series(src / "intact", n=20, patient_id="A", seed=1)
    changed, _, changed_uid = write_series(src / "changed", n=20, patient_id="B", seed=2)
    for path in intact + changed:
        _sign(path, path.with_suffix(".signed"), signers["rsa"], "--mac-sha256")
        path.with_suffix(".signed").replace(path)
    _flip_a_pixel_byte(changed[5])
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        listing = {s["series_instance_uid"]: s for s in series_listing(catalog)["series"]}
    assert report.series_ok == 1
    assert listing[intact_uid]["status"] == "ok"
    assert listing[changed_uid]["status"] == "rejected" and listing[changed_uid]["reason"] == "signature-mismatch"
    assert "changed after it was signed" in listing[changed_uid]["message"]
