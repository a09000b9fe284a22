"""Reading DICOM the way a PACS would: headers first, then geometry, then pixels.

Three steps, each usable alone:

1. :func:`read_header` reads one file without its pixel data into an :class:`InstanceHeader`.
2. :func:`plan_image` turns the headers of one series into an :class:`ImagePlan`: which file and
   frame is each slice, in spatial order (by position along the slice normal, never by file name or
   InstanceNumber), with spacing from the positions. All geometry checks happen here, before any
   pixel is decoded.
3. :func:`read_image` decodes the planned pixels, applies rescale slope/intercept (CT in HU) and
   MONOCHROME1 inversion, and returns an :class:`Image`.

Arrays are in DICOM order: ``(slices, rows, cols)`` for volumes and ``(rows, cols)`` for 2D images.
Every failure is a :class:`~imaging.errors.DicomError` that names the file and the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from imaging.errors import DicomError, Reason
from imaging.integrity import CodestreamError, SignatureError, check_codestream, verify_signatures

__all__ = [
    "Frame",
    "Image",
    "ImagePlan",
    "InstanceHeader",
    "ReadPolicy",
    "SliceRef",
    "affine_lps",
    "decode_pixels",
    "plan_images",
    "read_header",
    "read_image",
    "usable_modality",
]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")

# Geometry tolerances.
ORIENTATION_TOL = 1e-3  # direction cosine difference
POSITION_TOL_MM = 0.01  # positions closer than this along the normal are duplicates
SPACING_REL_TOL = 0.05  # a gap may differ from the median spacing by this fraction
SHEAR_TOL_MM = 0.1  # in-plane drift between consecutive slices (gantry tilt)

# What an image's values may be: anything else is a broken or hostile file, never "close enough".
MAX_PIXEL_SPACING_MM = 100.0
MAX_POSITION_MM = 1e5
UNIT_TOL = 1e-2  # direction cosines: unit length and orthogonal within this
MAX_RESCALE = 1e6
# Memory is bounded by the bytes on disk: compressed pixel data may decode to at most this many times the
# file's size (lossless ratios of real images are below 10), or to SMALL_IMAGE_BYTES whatever the file (a
# nearly uniform image compresses far better); uncompressed pixel data must be in the file.
MAX_COMPRESSION_RATIO = 64
SMALL_IMAGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Frame:
    """One 2D frame of a file: its index in the file, position, orientation and rescale."""

    index: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    slope: float
    intercept: float


@dataclass(frozen=True)
class InstanceHeader:
    """The header of one DICOM file: what the catalog and the geometry checks need.

    Identifying tags (``patient_id``, ``patient_name``, ``accession``) are read so the site catalog can
    keep them locally; nothing meant to leave the site may carry them.
    """

    path: Path
    size: int
    mtime_ns: int
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    modality: str
    body_part: str
    manufacturer: str
    model: str
    slice_thickness: float | None
    kvp: float | None
    field_strength: float | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    samples_per_pixel: int
    photometric: str
    bits_stored: int
    pixel_representation: int
    instance_number: int | None
    laterality: str
    view: str
    frame_of_reference: str
    image_type: str
    transfer_syntax: str
    has_pixels: bool
    frames: tuple[Frame, ...]
    description: str = ""  # SeriesDescription and ProtocolName: a hint of the region when BodyPartExamined is empty

    @property
    def n_frames(self) -> int:
        """Number of frames in this file."""
        return len(self.frames)


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of a planned image lives."""

    path: Path
    frame: int
    slope: float
    intercept: float


@dataclass(frozen=True)
class ImagePlan:
    """A validated image of one series, before decoding.

    Args:
        key: The image's identity: the SeriesInstanceUID for a volume, the SOPInstanceUID for a 2D
            image.
        study_uid: StudyInstanceUID.
        series_uid: SeriesInstanceUID.
        modality: DICOM Modality.
        slices: The slices in spatial order (one for a 2D image).
        shape: ``(slices, rows, cols)`` for a volume, ``(rows, cols)`` for a 2D image.
        spacing: mm, same axis order as ``shape``.
        origin: Patient position (LPS, mm) of the first voxel, or None for 2D images without one.
        orientation: Row and column direction cosines (6 values), or None.
        photometric: MONOCHROME1 or MONOCHROME2.
        bits_stored: BitsStored (for MONOCHROME1 inversion).
        pixel_representation: 0 unsigned, 1 signed.
        laterality: L/R for mammography, else empty.
        view: ViewPosition (CC, MLO...) or empty.
    """

    key: str
    study_uid: str
    series_uid: str
    modality: str
    slices: tuple[SliceRef, ...]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    photometric: str
    bits_stored: int
    pixel_representation: int
    laterality: str
    view: str

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.shape)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The distinct files of this image, in spatial order of their first slice."""
        return tuple(dict.fromkeys(s.path for s in self.slices))


@dataclass(frozen=True)
class Image:
    """A decoded image: float32 pixels in modality units (HU for CT) and its plan."""

    array: np.ndarray
    plan: ImagePlan

    def affine_lps(self) -> np.ndarray:
        """The 4x4 matrix from ``(col, row, slice)`` indices to patient LPS coordinates in mm."""
        return affine_lps(self.plan)


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(ds: Dataset, keyword: str, default: int | None) -> Any:
    """An integer attribute; ``default`` if absent; a malformed value raises ValueError naming it."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{keyword} = {value!r} is not an integer") from None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _xyz(value: Any) -> tuple[float, float, float] | None:
    xyz = _floats(value, 3)
    return None if xyz is None else (xyz[0], xyz[1], xyz[2])


def _first(seq_parent: Dataset | None, keyword: str) -> Dataset | None:
    if seq_parent is None:
        return None
    seq = seq_parent.get(keyword)
    return seq[0] if seq else None


def _frames(ds: Dataset, n_frames: int) -> tuple[Frame, ...]:
    """Per-frame geometry and rescale for single-frame and enhanced multi-frame objects."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if shared is None and not per_frame:
        position = _xyz(ds.get("ImagePositionPatient"))
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        slope = _float(ds, "RescaleSlope")
        intercept = _float(ds, "RescaleIntercept")
        return tuple(
            Frame(
                index=i,
                position=position if n_frames == 1 else None,
                orientation=orientation,
                slope=1.0 if slope is None else slope,
                intercept=0.0 if intercept is None else intercept,
            )
            for i in range(n_frames)
        )

    def lookup(group: Dataset | None, seq: str, keyword: str) -> Any:
        item = _first(group, seq)
        return None if item is None else item.get(keyword)

    frames = []
    for i in range(n_frames):
        group = per_frame[i] if per_frame and i < len(per_frame) else None

        def find(seq: str, keyword: str, group: Dataset | None = group) -> Any:
            value = lookup(group, seq, keyword)
            return lookup(shared, seq, keyword) if value is None else value

        slope = find("PixelValueTransformationSequence", "RescaleSlope")
        intercept = find("PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(
            Frame(
                index=i,
                position=_xyz(find("PlanePositionSequence", "ImagePositionPatient")),
                orientation=_floats(find("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                slope=1.0 if slope is None else float(slope),
                intercept=0.0 if intercept is None else float(intercept),
            )
        )
    return tuple(frames)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for source in (
        ds,
        _first(_first(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence"),
    ):
        if source is None:
            continue
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            value = _floats(source.get(keyword), 2)
            # 0\0 means "not known": try the next attribute. NaN or inf is kept, for the value check to name.
            if value is not None and (min(value) > 0 or not all(map(math.isfinite, value))):
                return (value[0], value[1])
    return None


def _slice_thickness(ds: Dataset) -> float | None:
    value = _float(ds, "SliceThickness")
    if value is None:
        measures = _first(_first(ds, "SharedFunctionalGroupsSequence"), "PixelMeasuresSequence")
        if measures is not None:
            value = _float(measures, "SliceThickness")
    return value


def _check_inflation(path: Path) -> None:
    """Raise if a deflated file would inflate past the memory bound, measured in small chunks before any
    reader holds it whole (a few MB of deflate can expand to many GB).

    Raises:
        DicomError: ``implausible-size``.
    """
    import zlib

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part-10 file: the normal read says what it is
        return
    if str(meta.get("TransferSyntaxUID", "")) != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    size = path.stat().st_size
    limit = max(MAX_COMPRESSION_RATIO * size, SMALL_IMAGE_BYTES)
    start = 132 + 12 + int(meta.get("FileMetaInformationGroupLength", 0))  # preamble, DICM, group length
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as fh:
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            while chunk:
                try:
                    total += len(inflater.decompress(chunk, 1 << 22))
                except zlib.error as exc:
                    raise DicomError(path, Reason.UNREADABLE, f"the deflated data set is corrupt ({exc})") from None
                if total > limit:
                    raise DicomError(path, Reason.IMPLAUSIBLE_SIZE,
                                     f"the deflated data set inflates past {limit / 2**20:.0f} MiB from "
                                     f"{size / 2**10:.0f} KiB on disk (more than {MAX_COMPRESSION_RATIO}x): the file "
                                     "is hostile or broken; re-export it")
                chunk = inflater.unconsumed_tail


def _open(path: Path, *, stop_before_pixels: bool) -> FileDataset:
    """Read ``path``; files without the Part-10 preamble are accepted if they parse as images."""
    _check_inflation(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass
    except (OSError, EOFError) as exc:
        raise DicomError(path, Reason.UNREADABLE, f"cannot read the file ({exc}); check permissions") from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on corrupt headers
        raise DicomError(path, Reason.UNREADABLE, f"corrupt DICOM header ({exc})") from exc
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(path, Reason.NOT_DICOM, "not a DICOM file") from exc
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
        raise DicomError(path, Reason.NOT_DICOM, "not a DICOM file (no DICM prefix and no UIDs)")
    # A file without meta information: record the encoding it was parsed with so pixels decode.
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def read_header(path: Path | str, *, stat: os.stat_result | None = None) -> InstanceHeader:
    """Read one file's header (no pixel data).

    Args:
        path: The file.
        stat: Its ``os.stat`` result, if the caller already has it.

    Returns:
        The header.

    Raises:
        DicomError: Not DICOM, unreadable, a DICOMDIR or another non-image object, or missing UIDs.
    """
    path = Path(path)
    st = stat if stat is not None else path.stat()
    ds = _open(path, stop_before_pixels=True)
    try:
        return _header(path, st, ds)
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed values in a parsed header
        raise DicomError(path, Reason.UNREADABLE, f"malformed header value ({exc}); fix or re-export the file") from exc


def _header(path: Path, st: os.stat_result, ds: FileDataset) -> InstanceHeader:
    meta = getattr(ds, "file_meta", None)
    sop_class = _str(meta, "MediaStorageSOPClassUID") if meta is not None else ""
    sop_class = _str(ds, "SOPClassUID") or sop_class
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise DicomError(path, Reason.DICOMDIR, "a DICOMDIR index (used to find files, holds no image)")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not _str(ds, k)]
    if missing:
        raise DicomError(
            path, Reason.MISSING_UID, f"missing {', '.join(missing)}; the file cannot be placed in a study"
        )
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    # stop_before_pixels leaves PixelData out; an image IOD always has Rows/Columns.
    has_pixels = rows > 0 and cols > 0
    n_frames = _int(ds, "NumberOfFrames", 1) if has_pixels else 0
    if has_pixels:
        _check_declared_size(path, st.st_size, ds, meta, rows, cols, n_frames)
    modality = _str(ds, "Modality").upper()
    return InstanceHeader(
        path=path,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        sop_class_uid=sop_class,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        patient_id=_str(ds, "PatientID"),
        patient_name=_str(ds, "PatientName"),
        accession=_str(ds, "AccessionNumber"),
        study_date=_str(ds, "StudyDate"),
        modality=modality,
        body_part=_str(ds, "BodyPartExamined").upper(),
        manufacturer=_str(ds, "Manufacturer"),
        model=_str(ds, "ManufacturerModelName"),
        slice_thickness=_slice_thickness(ds),
        kvp=_float(ds, "KVP"),
        field_strength=_float(ds, "MagneticFieldStrength"),
        rows=rows,
        cols=cols,
        pixel_spacing=_pixel_spacing(ds),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        photometric=_str(ds, "PhotometricInterpretation").upper(),
        bits_stored=_int(ds, "BitsStored", 16),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        instance_number=_int(ds, "InstanceNumber", None),
        laterality=(_str(ds, "ImageLaterality") or _str(ds, "Laterality")).upper(),
        view=_str(ds, "ViewPosition").upper(),
        frame_of_reference=_str(ds, "FrameOfReferenceUID"),
        image_type=_str(ds, "ImageType").upper(),
        transfer_syntax=_str(meta, "TransferSyntaxUID") if meta is not None else "",
        has_pixels=has_pixels,
        frames=_frames(ds, n_frames) if has_pixels else (),
        description=" ".join(v for v in (_str(ds, "SeriesDescription"), _str(ds, "ProtocolName")) if v),
    )


def _check_declared_size(path: Path, file_bytes: int, ds: Dataset, meta: Dataset | None, rows: int, cols: int,
                         n_frames: int) -> None:
    """Raise unless the bytes on disk can hold the image the header declares (before anything is allocated).

    Raises:
        DicomError: ``implausible-size`` (no frame, or more decoded bytes than the compression limit allows) or
            ``truncated-pixel-data`` (uncompressed pixel data larger than the file).
    """
    if n_frames < 1:
        raise DicomError(path, Reason.IMPLAUSIBLE_SIZE,
                         f"NumberOfFrames = {n_frames}: an image has at least one frame; re-export the file")
    samples = max(1, int(_int(ds, "SamplesPerPixel", 1) or 1))
    if _str(ds, "PhotometricInterpretation").upper().endswith("_422"):
        samples = 2  # chroma subsampled: two values per pixel on average
    bits = max(1, int(_int(ds, "BitsAllocated", 16) or 16))
    declared = rows * cols * n_frames * samples * bits // 8
    syntax = _str(meta, "TransferSyntaxUID") if meta is not None else ""
    uid = pydicom.uid.UID(syntax) if syntax else None
    compressed = uid is not None and uid.is_transfer_syntax and (uid.is_compressed or uid.is_deflated)
    if compressed and declared > max(MAX_COMPRESSION_RATIO * file_bytes, SMALL_IMAGE_BYTES):
        raise DicomError(path, Reason.IMPLAUSIBLE_SIZE,
                         f"{rows}x{cols} pixels x {n_frames} frame(s) would decode to {declared / 2**20:.0f} MiB "
                         f"from {file_bytes / 2**10:.0f} KiB on disk (more than {MAX_COMPRESSION_RATIO}x): the "
                         "header is wrong or the file is hostile; re-export it")
    if not compressed and declared > file_bytes:
        raise DicomError(path, Reason.TRUNCATED_PIXEL_DATA,
                         f"{rows}x{cols} pixels x {n_frames} frame(s) need {declared:,} bytes; the file holds "
                         f"{file_bytes:,}: it was cut short or its header is wrong; copy it again")


def _check_values(h: InstanceHeader) -> None:
    """Raise unless every geometry and rescale value of an image is finite and sane (NaN passes no tolerance
    check by itself: each value is checked here, once, before any is used).

    Raises:
        DicomError: ``invalid-geometry`` or ``invalid-rescale``, naming the value.
    """
    def finite(values: Sequence[float], bound: float) -> bool:
        return all(math.isfinite(v) and abs(v) <= bound for v in values)

    if h.pixel_spacing is not None and not (finite(h.pixel_spacing, MAX_PIXEL_SPACING_MM)
                                            and min(h.pixel_spacing) > 0):
        raise DicomError(h.path, Reason.INVALID_GEOMETRY,
                         f"PixelSpacing {h.pixel_spacing} is not a spacing (0 to {MAX_PIXEL_SPACING_MM:g} mm)")
    for f in h.frames:
        if f.position is not None and not finite(f.position, MAX_POSITION_MM):
            raise DicomError(h.path, Reason.INVALID_GEOMETRY,
                             f"ImagePositionPatient {f.position} of frame {f.index} is not a position")
        if f.orientation is not None:
            row, col = np.asarray(f.orientation[:3], float), np.asarray(f.orientation[3:], float)
            if not (finite(f.orientation, 1.0 + UNIT_TOL) and abs(np.linalg.norm(row) - 1) <= UNIT_TOL
                    and abs(np.linalg.norm(col) - 1) <= UNIT_TOL and abs(float(row @ col)) <= UNIT_TOL):
                raise DicomError(h.path, Reason.INVALID_GEOMETRY,
                                 f"ImageOrientationPatient {f.orientation} of frame {f.index} is not two orthogonal "
                                 "unit vectors")
        if not (finite((f.slope, f.intercept), MAX_RESCALE) and f.slope != 0):
            raise DicomError(h.path, Reason.INVALID_RESCALE,
                             f"RescaleSlope {f.slope} / RescaleIntercept {f.intercept} of frame {f.index} cannot map "
                             "stored values to modality values")


# Projection radiography: each instance is one 2D image (DICOM semantics, not a task's choice).
PROJECTION_MODALITIES = frozenset({"MG", "DX", "CR", "RG", "IO", "PX", "XA", "RF"})


@dataclass(frozen=True)
class ReadPolicy:
    """What the caller reads: which modalities, which of them as single 2D images, and the fewest slices a volume
    of each modality needs. :func:`imaging.presets.read_policy` builds the one the tasks need (ingest uses it);
    the default reads every greyscale modality, projection modalities as 2D, volumes of two slices or more.

    Attributes:
        modalities: The modalities read (None: all).
        two_d: The modalities whose instances are each one 2D image.
        min_slices: ``(modality, fewest slices)`` pairs; a modality not listed needs two.
    """

    modalities: frozenset[str] | None = None
    two_d: frozenset[str] = PROJECTION_MODALITIES
    min_slices: tuple[tuple[str, int], ...] = ()

    def fewest_slices(self, modality: str) -> int:
        """The fewest slices a volume of ``modality`` may have."""
        return max(2, dict(self.min_slices).get(modality, 2))


def usable_modality(header: InstanceHeader, policy: ReadPolicy = ReadPolicy()) -> None:
    """Check that a header is a greyscale image of a modality ``policy`` reads.

    Raises:
        DicomError: ``not-an-image``, ``modality-unused`` or ``colour-image``.
    """
    if not header.has_pixels:
        raise DicomError(
            header.path,
            Reason.NOT_AN_IMAGE,
            f"no pixel data (SOP class {header.sop_class_uid or 'unknown'}, modality {header.modality or '?'})",
        )
    if policy.modalities is not None and header.modality not in policy.modalities:
        used = sorted(policy.modalities)
        raise DicomError(
            header.path,
            Reason.MODALITY_UNUSED,
            f"modality {header.modality or '(empty)'} is not used by any task (tasks read {', '.join(used)})",
        )
    if header.samples_per_pixel != 1 or header.photometric not in GREY_PHOTOMETRICS:
        raise DicomError(
            header.path,
            Reason.COLOUR_IMAGE,
            f"{header.photometric or '?'} with {header.samples_per_pixel} samples per pixel; "
            "tasks need greyscale (MONOCHROME1/2) images",
        )


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def plan_images(headers: Sequence[InstanceHeader], *, policy: ReadPolicy = ReadPolicy()) -> list[ImagePlan]:
    """Plan the images of one series: one volume, or one 2D image per instance for 2D modalities.

    Args:
        headers: All headers of one series (same SeriesInstanceUID), any order.
        policy: The modalities read, which are 2D, and the fewest slices of a volume.

    Returns:
        The validated plans.

    Raises:
        DicomError: The reason the series cannot be used (named after its first file).
    """
    if not headers:
        raise ValueError("plan_images needs at least one header")
    first = min(headers, key=lambda h: str(h.path))
    for h in headers:
        usable_modality(h, policy)
        _check_values(h)
    for what, values in (("studies", {h.study_uid for h in headers}), ("modalities", {h.modality for h in headers})):
        if len(values) > 1:
            raise DicomError(first.path, Reason.MIXED_SERIES,
                             f"one SeriesInstanceUID spans {len(values)} {what}: the files are mislabelled; "
                             "re-export them from the PACS")
    sizes = {(h.rows, h.cols) for h in headers}
    if len(sizes) > 1:
        raise DicomError(
            first.path,
            Reason.MIXED_SIZE,
            f"series mixes image sizes {sorted(sizes)}; split it into one series per size",
        )
    if first.modality in policy.two_d:
        return [_plan_2d(h) for h in sorted(headers, key=lambda h: str(h.path))]
    return [_plan_volume(headers, first, min_slices=policy.fewest_slices(first.modality))]


def _plan_2d(h: InstanceHeader) -> ImagePlan:
    if h.n_frames != 1:
        raise DicomError(
            h.path, Reason.MIXED_SIZE, f"{h.n_frames} frames in a {h.modality} image; one frame expected"
        )
    frame = h.frames[0]
    spacing = h.pixel_spacing or (1.0, 1.0)
    return ImagePlan(
        key=h.sop_instance_uid,
        study_uid=h.study_uid,
        series_uid=h.series_uid,
        modality=h.modality,
        slices=(SliceRef(h.path, 0, frame.slope, frame.intercept),),
        shape=(h.rows, h.cols),
        spacing=spacing,
        origin=frame.position,
        orientation=frame.orientation,
        photometric=h.photometric,
        bits_stored=h.bits_stored,
        pixel_representation=h.pixel_representation,
        laterality=h.laterality,
        view=h.view,
    )


def _plan_volume(headers: Sequence[InstanceHeader], first: InstanceHeader, *, min_slices: int) -> ImagePlan:
    entries = [(h, f) for h in headers for f in h.frames]

    def too_few() -> DicomError:
        return DicomError(
            first.path,
            Reason.TOO_FEW_SLICES,
            f"{len(entries)} slice(s); {first.modality} tasks need at least {min_slices}",
        )

    if len(entries) < 2:
        raise too_few()
    missing = [h.path for h, f in entries if f.position is None or f.orientation is None]
    if missing:
        raise DicomError(
            missing[0],
            Reason.MISSING_GEOMETRY,
            f"{len(missing)} slice(s) lack ImagePositionPatient/ImageOrientationPatient; "
            "a volume cannot be built without them",
        )
    orientations = np.array([f.orientation for _, f in entries], float)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOL:
        odd = entries[int(np.abs(orientations - orientations[0]).max(axis=1).argmax())][0]
        raise DicomError(
            odd.path,
            Reason.MIXED_ORIENTATION,
            "slices have different ImageOrientationPatient (e.g. a localizer mixed in); "
            "keep one orientation per series",
        )
    spacing_rc = {h.pixel_spacing for h in headers}
    if None in spacing_rc or len(spacing_rc) > 1:
        raise DicomError(
            first.path,
            Reason.MISSING_GEOMETRY if None in spacing_rc else Reason.MIXED_SIZE,
            f"PixelSpacing missing or not the same on every slice ({sorted(map(str, spacing_rc))})",
        )
    orientation = tuple(float(v) for v in orientations[0])
    normal = _normal(orientation)
    positions = np.array([f.position for _, f in entries], float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    gaps = np.diff(along)
    dup = np.flatnonzero(gaps < POSITION_TOL_MM)
    if dup.size:
        h = entries[int(order[dup[0] + 1])][0]
        raise DicomError(
            h.path,
            Reason.DUPLICATE_SLICE_POSITION,
            f"{dup.size} slice(s) share a position along the normal (e.g. {along[dup[0]]:.2f} mm): "
            "several phases or acquisitions in one series; split them",
        )
    step = float(np.median(gaps))
    rel = np.abs(gaps - step) / step
    bad = np.flatnonzero(rel > SPACING_REL_TOL)
    if bad.size:
        g = float(gaps[bad[0]])
        ratio = g / step
        if ratio > 1.5 and abs(ratio - round(ratio)) < 0.25:
            raise DicomError(
                first.path,
                Reason.MISSING_SLICE,
                f"{int(round(ratio)) - 1} slice(s) missing after position {along[bad[0]]:.2f} mm "
                f"(gap {g:.2f} mm, spacing {step:.2f} mm); re-export the complete series",
            )
        raise DicomError(
            first.path,
            Reason.UNEVEN_SPACING,
            f"slice gaps vary from {gaps.min():.2f} to {gaps.max():.2f} mm (median {step:.2f} mm, "
            f"tolerance {SPACING_REL_TOL:.0%}); resample or split the series",
        )
    drift = np.diff(positions, axis=0) - np.outer(gaps, normal)
    if np.abs(drift).max() > SHEAR_TOL_MM:
        raise DicomError(
            first.path,
            Reason.SHEARED_GEOMETRY,
            f"slice origins drift {np.abs(drift).max():.2f} mm in-plane between slices (gantry tilt); "
            "reconstruct without tilt or resample to an orthogonal grid",
        )
    # Counted last: a series with a gap is reported as missing a slice, which says what to fix.
    if len(entries) < min_slices:
        raise too_few()
    ordered = [entries[int(i)] for i in order]
    pr, pc = first.pixel_spacing  # type: ignore[misc]
    return ImagePlan(
        key=first.series_uid,
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        modality=first.modality,
        slices=tuple(SliceRef(h.path, f.index, f.slope, f.intercept) for h, f in ordered),
        shape=(len(ordered), first.rows, first.cols),
        spacing=(step, pr, pc),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        orientation=orientation,
        photometric=first.photometric,
        bits_stored=first.bits_stored,
        pixel_representation=first.pixel_representation,
        laterality=first.laterality,
        view=first.view,
    )


def decode_pixels(path: Path) -> np.ndarray:
    """Decode the stored pixel values of one file: ``(rows, cols)`` or ``(frames, rows, cols)``.

    A decode is trusted only after the checks of :mod:`imaging.integrity`: compressed frames must agree
    with the header, and a file that carries digital signatures must still match them.

    Raises:
        DicomError: ``truncated-pixel-data``, ``undecodable-pixel-data``, ``corrupt-codestream`` or
            ``signature-mismatch``.
    """
    ds = _open(path, stop_before_pixels=False)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomError(path, Reason.TRUNCATED_PIXEL_DATA, "the file ends before its pixel data")
    try:
        verify_signatures(ds)
    except SignatureError as exc:
        raise DicomError(path, Reason.SIGNATURE_MISMATCH,
                         f"{exc}; its pixels cannot be trusted: export it again from its source") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a malformed signature item
        raise DicomError(path, Reason.SIGNATURE_MISMATCH,
                         f"its digital signature cannot be read ({type(exc).__name__}); export it again") from None
    try:
        check_codestream(ds, rows=int(_int(ds, "Rows", 0) or 0), cols=int(_int(ds, "Columns", 0) or 0),
                         samples=max(1, int(_int(ds, "SamplesPerPixel", 1) or 1)),
                         bits_allocated=int(_int(ds, "BitsAllocated", 16) or 16),
                         n_frames=max(1, int(_int(ds, "NumberOfFrames", 1) or 1)))
    except CodestreamError as exc:
        raise DicomError(path, Reason.CORRUPT_CODESTREAM,
                         f"{exc}: the compressed pixel data is damaged; copy or export the file again") from None
    try:
        return np.asarray(ds.pixel_array)
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise DicomError(
                path, Reason.TRUNCATED_PIXEL_DATA, f"{exc}; the file was cut short, copy it again"
            ) from exc
        raise DicomError(path, Reason.UNDECODABLE_PIXEL_DATA, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(ts, "name", ts)
        first_line = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise DicomError(
            path,
            Reason.UNDECODABLE_PIXEL_DATA,
            f"cannot decode pixel data in transfer syntax {name} ({first_line})",
        ) from exc


def read_image(plan: ImagePlan) -> Image:
    """Decode a planned image into float32 modality values.

    Rescale slope/intercept are applied per slice (CT in HU); MONOCHROME1 is inverted so that higher
    values are brighter for every image.

    Raises:
        DicomError: Truncated or undecodable pixel data, or a frame whose size differs from the plan.
    """
    rows, cols = plan.shape[-2:]
    out = np.empty((len(plan.slices), rows, cols), np.float32)
    decoded: dict[Path, np.ndarray] = {}
    for i, ref in enumerate(plan.slices):
        pixels = decoded.get(ref.path)
        if pixels is None:
            pixels = decode_pixels(ref.path)
            if pixels.ndim == 2:
                pixels = pixels[None]
            decoded = {ref.path: pixels}  # frames of one file are contiguous in most series
        if ref.frame >= pixels.shape[0] or pixels.shape[1:] != (rows, cols):
            raise DicomError(
                ref.path,
                Reason.UNDECODABLE_PIXEL_DATA,
                f"decoded shape {pixels.shape} does not hold frame {ref.frame} of {rows}x{cols}",
            )
        stored = pixels[ref.frame].astype(np.float32)
        if plan.photometric == "MONOCHROME1":  # mirror within the stored range: max + min - value
            stored = (float(2**plan.bits_stored - 1) if plan.pixel_representation == 0 else -1.0) - stored
        out[i] = stored * ref.slope + ref.intercept
    return Image(array=out[0] if plan.spatial_dims == 2 else out, plan=plan)


def affine_lps(plan: ImagePlan) -> np.ndarray:
    """4x4 matrix mapping voxel indices ``(col, row, slice)`` to patient LPS mm.

    For 2D images without a patient position, the matrix is a plain scaling by the pixel spacing.
    """
    affine = np.eye(4)
    if plan.orientation is None or plan.origin is None:
        affine[0, 0], affine[1, 1] = plan.spacing[-1], plan.spacing[-2]
        return affine
    row_dir = np.asarray(plan.orientation[:3])
    col_dir = np.asarray(plan.orientation[3:])
    affine[:3, 0] = row_dir * plan.spacing[-1]  # along a row: column index, column spacing
    affine[:3, 1] = col_dir * plan.spacing[-2]  # down a column: row index, row spacing
    if plan.spatial_dims == 3:
        affine[:3, 2] = _normal(plan.orientation) * plan.spacing[0]
    else:
        affine[:3, 2] = _normal(plan.orientation)
    affine[:3, 3] = plan.origin
    return affine
