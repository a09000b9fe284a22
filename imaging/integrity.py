"""Can decoded pixels be trusted? Codestream structure against the header, and DICOM digital signatures.

A decoder that returns an array has not proved that the array is the image: a lossless JPEG 2000 or
JPEG-LS codestream carries no checksum, so bytes flipped inside its entropy-coded data decode without an
error into wrong pixels. What *can* be checked is checked here, before the pixels are used:

* **Structure** (:func:`check_codestream`, every compressed file): the number of frames in the
  encapsulated pixel data, and each frame's codestream against the header: JPEG 2000 and HTJ2K (the SIZ
  marker's width, height, components and precision; the main header's marker segments; every tile-part
  length; the end-of-codestream marker), JPEG and JPEG-LS (the SOF marker's width, height, components and
  precision; every marker segment's length; a scan before the end-of-image marker, which must end the
  frame), RLE (the segment count and offsets). A cut or spliced codestream, or one with bytes flipped in
  its headers or lengths, is rejected as ``corrupt-codestream``.
* **Content** (:func:`verify_signatures`, where the file carries a DICOM Digital Signature, PS3.15 Annex
  C): the MAC over the signed data elements (the pixel data among them, encapsulated as stored) is computed
  again in the MAC Calculation Transfer Syntax and checked against the signature with the public key of the
  certificate it carries (RSA PKCS #1 v1.5, DSA or ECDSA; MD5, SHA-1, RIPEMD-160 and the SHA-2 family). A
  file changed after it was signed, in any byte it signed, is rejected as ``signature-mismatch``. This
  proves integrity, not who signed: the certificate chain is not checked (the site trusts its own PACS).

Bytes flipped inside the entropy-coded data of an unsigned lossless file cannot be detected by any check
of the file alone (the decoded values stay in range and the structure stays intact); sites that need that
guarantee sign their exports (for example ``dcmsign --sign``) or store them with signatures.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import datadict
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

__all__ = [
    "CodestreamError",
    "SignatureCheck",
    "SignatureError",
    "check_codestream",
    "verify_signatures",
]

JPEG2000_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
}
JPEG_LS_SYNTAXES = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                 "1.2.840.10008.1.2.4.70"}
RLE_SYNTAX = "1.2.840.10008.1.2.5"

# Start-of-frame markers of ISO 10918 (every SOFn but DHT C4, JPG C8 and DAC CC) and JPEG-LS (F7, F9).
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7, 0xF9}
# Markers without a length segment.
STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


class CodestreamError(ValueError):
    """A compressed frame whose structure contradicts the header or itself (a PHI-free sentence)."""


class SignatureError(ValueError):
    """A DICOM digital signature that does not match the file's content (a PHI-free sentence)."""


# ---------------------------------------------------------------------------------------------- structure


def check_codestream(ds: Dataset, *, rows: int, cols: int, samples: int, bits_allocated: int,
                     n_frames: int) -> None:
    """Check the encapsulated pixel data of ``ds`` frame by frame against the header's declared image.

    Does nothing for native (uncompressed or deflated) pixel data, whose size is checked elsewhere.

    Raises:
        CodestreamError: The frames or a frame's codestream cannot be the image the header declares.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax or not UID(syntax).is_encapsulated or "PixelData" not in ds:
        return
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=n_frames))
    except (ValueError, struct.error) as exc:
        raise CodestreamError(f"the encapsulated pixel data is not a valid item sequence ({exc})") from None
    if len(frames) != n_frames:
        raise CodestreamError(f"the pixel data holds {len(frames)} frame(s); the header declares {n_frames}")
    for index, frame in enumerate(frames):
        where = f"frame {index + 1}" if n_frames > 1 else "the frame"
        try:
            if syntax in JPEG2000_SYNTAXES:
                _check_j2k(frame, rows, cols, samples, bits_allocated)
            elif syntax in JPEG_LS_SYNTAXES or syntax in JPEG_SYNTAXES:
                _check_jpeg(frame, rows, cols, samples, bits_allocated, ls=syntax in JPEG_LS_SYNTAXES)
            elif syntax == RLE_SYNTAX:
                _check_rle(frame, samples, bits_allocated)
        except CodestreamError as exc:
            raise CodestreamError(f"{where}: {exc}") from None
        except (IndexError, struct.error):
            raise CodestreamError(f"{where}: the codestream ends inside a marker segment") from None


def _u16(b: bytes, at: int) -> int:
    return struct.unpack_from(">H", b, at)[0]


def _u32(b: bytes, at: int) -> int:
    return struct.unpack_from(">I", b, at)[0]


def _ends_at(b: bytes, end: int) -> bool:
    """True if ``end`` is the codestream's end: nothing follows but the one byte that pads a fragment to an even
    length (zero by the standard; some encoders write FF)."""
    return end == len(b) or (end == len(b) - 1 and b[-1] in (0x00, 0xFF))


def _check_j2k(b: bytes, rows: int, cols: int, samples: int, bits_allocated: int) -> None:
    if b[:4] != b"\xff\x4f\xff\x51":
        start = b.find(b"\xff\x4f\xff\x51", 0, 4096) if b[4:8] == b"jP  " else -1  # a JP2 file: find its stream
        if start < 0:
            raise CodestreamError("no JPEG 2000 codestream (missing SOC and SIZ markers)")
        b = b[start:]
    lsiz = _u16(b, 4)
    csiz = _u16(b, 40)
    if lsiz != 38 + 3 * csiz:
        raise CodestreamError(f"SIZ marker length {lsiz} does not fit its {csiz} component(s)")
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = struct.unpack_from(">8I", b, 8)
    if (xsiz - xo, ysiz - yo) != (cols, rows) or csiz != samples:
        raise CodestreamError(f"the codestream holds {xsiz - xo}x{ysiz - yo} pixels with {csiz} component(s); "
                              f"the header declares {cols}x{rows} with {samples}")
    for c in range(csiz):
        precision = (b[42 + 3 * c] & 0x7F) + 1
        if precision > max(bits_allocated, 8) or precision > 38:
            raise CodestreamError(f"component {c} has {precision} bits; the header allocates {bits_allocated}")
    if xt == 0 or yt == 0 or xto > xo or yto > yo:
        raise CodestreamError("SIZ marker declares an impossible tile grid")
    n_tiles = math.ceil((xsiz - xto) / xt) * math.ceil((ysiz - yto) / yt)
    pos = 4 + lsiz
    while _u16(b, pos) != 0xFF90:  # main header marker segments up to the first tile-part (SOT)
        marker, length = _u16(b, pos), _u16(b, pos + 2)
        if marker >> 8 != 0xFF or length < 2:
            raise CodestreamError(f"main header is broken at byte {pos} (marker {marker:04X})")
        pos += 2 + length
    seen: set[int] = set()
    while True:
        marker = _u16(b, pos)
        if marker == 0xFFD9:  # EOC
            if not _ends_at(b, pos + 2):
                raise CodestreamError(f"{len(b) - pos - 2} byte(s) follow the end-of-codestream marker")
            break
        if marker != 0xFF90 or _u16(b, pos + 2) != 10:
            raise CodestreamError(f"expected a tile-part or the end of the codestream at byte {pos}")
        tile, psot = _u16(b, pos + 4), _u32(b, pos + 6)
        if tile >= n_tiles:
            raise CodestreamError(f"tile-part of tile {tile}; the grid has {n_tiles} tile(s)")
        seen.add(tile)
        if psot == 0:  # the last tile-part runs to the end-of-codestream marker
            if b[-2:] != b"\xff\xd9" and not (b[-3:-1] == b"\xff\xd9" and b[-1] in (0x00, 0xFF)):
                raise CodestreamError("the codestream does not end with an end-of-codestream marker")
            break
        if psot < 14 or pos + psot > len(b) - 2:
            raise CodestreamError(f"tile-part length {psot} at byte {pos} runs past the codestream")
        pos += psot
    if len(seen) != n_tiles:
        raise CodestreamError(f"{n_tiles - len(seen)} of {n_tiles} tile(s) are missing")


def _next_marker(b: bytes, pos: int, *, ls: bool) -> int:
    """Position of the next marker after entropy-coded data starting at ``pos``."""
    while True:
        pos = b.index(b"\xff", pos)
        nxt = b[pos + 1]
        if ls and nxt < 0x80:  # JPEG-LS bit stuffing: FF followed by a 0 bit is data
            pos += 1
        elif not ls and (nxt == 0x00 or 0xD0 <= nxt <= 0xD7):  # stuffed FF or a restart marker
            pos += 2
        elif nxt == 0xFF:  # fill byte
            pos += 1
        else:
            return pos


def _check_jpeg(b: bytes, rows: int, cols: int, samples: int, bits_allocated: int, *, ls: bool) -> None:
    kind = "JPEG-LS" if ls else "JPEG"
    if b[:2] != b"\xff\xd8":
        raise CodestreamError(f"no {kind} codestream (missing start-of-image marker)")
    pos, frame_seen, scans = 2, False, 0
    try:
        while True:
            if b[pos] != 0xFF:
                raise CodestreamError(f"expected a marker at byte {pos}")
            while b[pos + 1] == 0xFF:  # fill bytes
                pos += 1
            marker = b[pos + 1]
            if marker == 0xD9:  # EOI
                if not frame_seen or scans == 0:
                    raise CodestreamError("the image ends before its frame header or scan")
                if not _ends_at(b, pos + 2):
                    raise CodestreamError(f"{len(b) - pos - 2} byte(s) follow the end-of-image marker")
                return
            if marker in STANDALONE_MARKERS:
                pos += 2
                continue
            length = _u16(b, pos + 2)
            if length < 2 or pos + 2 + length > len(b):
                raise CodestreamError(f"marker FF{marker:02X} at byte {pos} has an impossible length {length}")
            if marker in SOF_MARKERS:
                precision, height, width, components = b[pos + 4], _u16(b, pos + 5), _u16(b, pos + 7), b[pos + 9]
                if width != cols or height not in (rows, 0) or components != samples:
                    raise CodestreamError(f"the codestream holds {width}x{height} pixels with {components} "
                                          f"component(s); the header declares {cols}x{rows} with {samples}")
                if precision > max(bits_allocated, 8):
                    raise CodestreamError(f"{precision}-bit samples; the header allocates {bits_allocated} bits")
                frame_seen = True
            pos += 2 + length
            if marker == 0xDA:  # SOS: entropy-coded data follows up to the next marker
                if not frame_seen:
                    raise CodestreamError("a scan comes before the frame header")
                scans += 1
                pos = _next_marker(b, pos, ls=ls)
    except ValueError as exc:
        if isinstance(exc, CodestreamError):
            raise
        raise CodestreamError("the codestream ends without an end-of-image marker") from None


def _check_rle(b: bytes, samples: int, bits_allocated: int) -> None:
    if len(b) < 64:
        raise CodestreamError("the RLE header is cut short")
    header = struct.unpack_from("<16I", b, 0)
    expected = samples * max(1, bits_allocated // 8)
    if header[0] != expected:
        raise CodestreamError(f"{header[0]} RLE segment(s); {samples} sample(s) of {bits_allocated} bits need "
                              f"{expected}")
    offsets = header[1: 1 + expected]
    if offsets[0] != 64 or any(b2 <= a for a, b2 in zip(offsets, offsets[1:], strict=False)) or offsets[-1] >= len(b):
        raise CodestreamError("the RLE segment offsets are out of order or past the frame")


# ---------------------------------------------------------------------------------------------- signatures

# Data elements of a Digital Signatures Sequence item that are not part of its MAC (PS3.15 C.1).
_UNSIGNED_ITEM_TAGS = {0x04000115, 0x04000120, 0x04000305, 0x04000310}
_HASHES = {"MD5": "md5", "SHA1": "sha1", "RIPEMD160": "ripemd160", "SHA256": "sha256", "SHA384": "sha384",
           "SHA512": "sha512"}
# DER DigestInfo prefixes of PKCS #1 v1.5 (RFC 8017, section 9.2, note 1).
_DIGEST_INFO = {
    "md5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "ripemd160": bytes.fromhex("3021300906052b2403020105000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_MAC_SYNTAXES = {ExplicitVRLittleEndian, *JPEG2000_SYNTAXES, *JPEG_LS_SYNTAXES, *JPEG_SYNTAXES, RLE_SYNTAX,
                 "1.2.840.10008.1.2.1.99"}  # explicit little endian encodings (deflate is undone on reading)


@dataclass(frozen=True)
class SignatureCheck:
    """What the signatures of one file proved.

    Attributes:
        verified: Signatures whose MAC and signature matched.
        unverifiable: Signatures in a form this site cannot check (an unknown MAC algorithm, key or transfer
            syntax); they neither pass nor fail the file.
        covers_pixels: True if a verified signature includes the pixel data.
    """

    verified: int = 0
    unverifiable: int = 0
    covers_pixels: bool = False


def verify_signatures(ds: Dataset) -> SignatureCheck:
    """Verify every DICOM digital signature in the top level of ``ds`` (read with its pixel data).

    Raises:
        SignatureError: A signature's MAC or signature does not match the content it signs.
    """
    if "DigitalSignaturesSequence" not in ds:
        return SignatureCheck()
    params = {int(item.get("MACIDNumber", -1)): item for item in ds.get("MACParametersSequence") or []}
    verified = unverifiable = 0
    covers_pixels = False
    for number, item in enumerate(ds.DigitalSignaturesSequence, 1):
        mac = params.get(int(item.get("MACIDNumber", -1)))
        if mac is None:
            raise SignatureError(f"signature {number} has no MAC parameters: the file was altered after signing")
        hash_name = _HASHES.get(str(mac.get("MACAlgorithm", "")).strip().upper())
        syntax = str(mac.get("MACCalculationTransferSyntaxUID", ""))
        if hash_name is None or syntax not in _MAC_SYNTAXES or str(item.get("CertificateType", "")).strip() != \
                "X509_1993_SIG":
            unverifiable += 1
            continue
        signed = mac.get("DataElementsSigned")
        tags = {int(t) for t in ([signed] if isinstance(signed, BaseTag) else signed or [])}
        digest = hashlib.new(hash_name)
        for chunk in _signed_bytes(ds, tags):
            digest.update(chunk)
        for chunk in _item_bytes(item):
            digest.update(chunk)
        outcome = _check_signature(bytes(item.get("CertificateOfSigner", b"")), bytes(item.get("Signature", b"")),
                                   hash_name, digest.digest())
        if outcome is None:
            unverifiable += 1
            continue
        if not outcome:
            raise SignatureError(f"signature {number} does not match the file's content: it changed after it was "
                                 "signed")
        verified += 1
        covers_pixels = covers_pixels or 0x7FE00010 in tags
    return SignatureCheck(verified, unverifiable, covers_pixels)


def _check_signature(certificate: bytes, signature: bytes, hash_name: str, digest: bytes) -> bool | None:
    """True/False for a signature that matches or not; None when the key type cannot be checked here."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa, utils

    try:
        key = x509.load_der_x509_certificate(_der(certificate)).public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None
    if isinstance(key, rsa.RSAPublicKey):  # PKCS #1 v1.5 by hand: it covers RIPEMD-160 too
        numbers = key.public_numbers()
        size = (key.key_size + 7) // 8
        if len(signature) != size:
            return False
        em = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(size, "big")
        info = _DIGEST_INFO[hash_name] + digest
        return em == b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    algorithms = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
    if hash_name not in algorithms or not isinstance(key, (dsa.DSAPublicKey, ec.EllipticCurvePublicKey)):
        return None
    prehashed = utils.Prehashed(algorithms[hash_name]())
    signature = _der(signature)  # a DER signature of odd length is padded with a zero byte in DICOM
    try:
        if isinstance(key, dsa.DSAPublicKey):
            key.verify(signature, digest, prehashed)
        else:
            key.verify(signature, digest, ec.ECDSA(prehashed))
    except InvalidSignature:
        return False
    return True


def _der(value: bytes) -> bytes:
    """A DER value without the zero byte that pads it to an even length in DICOM."""
    if len(value) >= 2 and value[1] & 0x80:
        n = value[1] & 0x7F
        return value[: 2 + n + int.from_bytes(value[2: 2 + n], "big")]
    return value[: 2 + value[1]] if len(value) >= 2 else value


def _signed_bytes(ds: Dataset, tags: set[int]) -> Iterator[bytes]:
    """The byte stream of PS3.15 C.1 for the listed top-level elements, in tag order."""
    for tag in sorted(tags):
        if tag in ds and (tag & 0xFFFF) != 0:
            yield from _element_bytes(ds, Tag(tag))


def _item_bytes(item: Dataset) -> Iterator[bytes]:
    """The signature item's own elements that are part of its MAC (all but certificate, signature, timestamp)."""
    for tag in sorted(int(t) for t in item.keys()):  # noqa: SIM118 - a Dataset iterates elements
        if tag not in _UNSIGNED_ITEM_TAGS and (tag & 0xFFFF) != 0:
            yield from _element_bytes(item, Tag(tag))


def _vr_of(elem: RawDataElement | DataElement, ds: Dataset) -> str:
    vr = elem.VR
    if vr:
        return str(vr)
    try:
        vr = datadict.dictionary_VR(elem.tag)
    except KeyError:
        return "UN"
    if vr == "OB or OW":
        return "OW"
    if vr in ("US or SS", "US or OW", "US or SS or OW"):
        return "SS" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "US"
    return vr


def _element_bytes(ds: Dataset, tag: BaseTag) -> Iterator[bytes]:
    """One element in the signature encoding: explicit VR little endian, every sequence, item and undefined
    length left out, item tags and the sequence delimiter kept (what ``dcmsign`` hashes)."""
    raw = ds.get_item(tag)
    vr = _vr_of(raw, ds)
    head = struct.pack("<HH", tag.group, tag.element) + vr.encode("ascii")
    if vr == "SQ":
        yield head + b"\x00\x00"
        for item in ds[tag].value if isinstance(ds[tag].value, DicomSequence) else ():
            yield struct.pack("<HH", 0xFFFE, 0xE000)
            for item_tag in sorted(int(t) for t in item.keys()):  # noqa: SIM118
                if item_tag & 0xFFFF:
                    yield from _element_bytes(item, Tag(item_tag))
        yield struct.pack("<HH", 0xFFFE, 0xE0DD)
        return
    value = raw.value if isinstance(raw, RawDataElement) or isinstance(raw.value, bytes) else _encoded(ds, tag)
    value = value or b""
    undefined = raw.length == 0xFFFFFFFF if isinstance(raw, RawDataElement) else raw.is_undefined_length
    if undefined:  # encapsulated pixel data: items without their lengths, then the sequence delimiter
        yield head + b"\x00\x00"
        pos = 0
        while pos + 8 <= len(value):
            group, element, length = struct.unpack_from("<HHI", value, pos)
            if (group, element) != (0xFFFE, 0xE000):
                break
            yield struct.pack("<HH", 0xFFFE, 0xE000) + value[pos + 8: pos + 8 + length]
            pos += 8 + length
        yield struct.pack("<HH", 0xFFFE, 0xE0DD)
        return
    if vr in _LONG_VRS:
        yield head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    else:
        yield head + struct.pack("<H", len(value)) + value


def _encoded(ds: Dataset, tag: BaseTag) -> bytes:
    """Value bytes of an element that was already converted (explicit VR little endian, padded)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_data_element(buffer, ds[tag])
    return buffer.getvalue()[8:]  # implicit: tag (4) and length (4), then the value
