"""Lesion annotations: DICOM Segmentation objects (SEG) and RT Structure Sets (RTSTRUCT) as boolean masks on the
grid of the image they mark.

Two steps, like reading an image:

1. :func:`read_annotation_ref` reads an annotation's header: its kind and what it references (series and
   instances). Ingest matches it to the catalog's image with it: by referenced series for a volume, by
   referenced SOP instance for a 2D image.
2. :func:`read_annotation` places it on an :class:`~imaging.dicom.ImagePlan`'s grid and returns a boolean mask
   in exactly the layout of ``read_image(plan).array``: ``(slices, rows, cols)`` for a volume in the reader's
   spatial order, ``(rows, cols)`` for a 2D image.

A SEG frame lands on the slice at its ImagePositionPatient (along the slice normal within 0.1 of the slice
spacing, in-plane within 0.1 of a pixel), or on the slice it references (DerivationImageSequence) when it has
no position (mammograms); when it has both they must agree. Rows, columns, pixel spacing and orientation must be
the image's. BINARY, FRACTIONAL (thresholded at 0.5 of the maximum) and LABELMAP segmentations are read.

An RT Structure Set's CLOSED_PLANAR contours are filled on the slice whose plane they lie on (every point
within 0.1 of the slice spacing), with the even-odd rule (a contour inside another is a hole); voxel centres on
a contour count as inside. A contour that references a slice (ContourImageSequence) must lie on it.

Which segments or ROIs mark a lesion: those that say so (SEG: category *Morphologically Altered Structure*,
or a label or type naming a lesion, tumour, nodule, mass...; RTSTRUCT: interpreted type GTV or such a name).
If none says so, every one that does not say it is something else (SEG: an anatomical structure or tissue;
RTSTRUCT: EXTERNAL, ORGAN, PTV, CTV, AVOIDANCE and the other non-lesion types). Several are united. A SEG
segment made by an algorithm (SegmentAlgorithmType AUTOMATIC: a model's prediction, oncofed's own among them,
stored in the PACS) is never a reference: a SEG with only such lesion segments is rejected
(``annotation-automatic``).

Memory is bounded before anything is decoded: a SEG's declared frames x rows x columns must fit the image
(at most one frame per segment and slice) and the bytes on disk.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from imaging.dicom import (
    MAX_COMPRESSION_RATIO,
    MAX_POSITION_MM,
    ORIENTATION_TOL,
    SMALL_IMAGE_BYTES,
    ImagePlan,
    InstanceHeader,
    read_header,
)
from imaging.errors import DicomError, Reason
from imaging.layout import ANNOTATIONS_DIR

__all__ = [
    "ANNOTATIONS_DIR",
    "ANNOTATION_MODALITIES",
    "GEOMETRY_TOL",
    "MAX_ANNOTATION_VOXELS",
    "Annotation",
    "AnnotationKind",
    "AnnotationRef",
    "SliceGeometry",
    "mask_file_name",
    "polygon_mask",
    "read_annotation",
    "read_annotation_ref",
    "slice_geometry",
    "write_mask",
]

GEOMETRY_TOL = 0.1
"""How far a frame or contour may be from a slice: this fraction of the slice spacing along the normal, and of a
pixel in-plane."""

MAX_ANNOTATION_VOXELS = 2**30
"""The most voxels (frames x rows x columns) a SEG may declare, whatever the image (1 GiB decoded)."""

LESION_WORDS = ("lesion", "tumo", "neoplas", "nodul", "mass", "cancer", "carcinom", "metasta", "malignan", "gtv")
LESION_CATEGORIES = frozenset({"49755003", "M-01000"})  # SNOMED CT / SRT: Morphologically Altered Structure
ANATOMY_CATEGORIES = frozenset({"91723000", "T-D000A", "85756007", "T-D0050", "123037004", "T-D0010"})
LESION_ROI_TYPES = frozenset({"GTV"})
NON_LESION_ROI_TYPES = frozenset({
    "EXTERNAL", "ORGAN", "PTV", "CTV", "AVOIDANCE", "BOLUS", "SUPPORT", "FIXATION", "CAVITY", "CONTROL",
    "DOSE_REGION", "CONTRAST_AGENT", "MARKER", "REGISTRATION", "ISOCENTER", "TREATED_VOLUME", "IRRAD_VOLUME",
    "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD",
})
UNCOMPRESSED = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})


class AnnotationKind(StrEnum):
    """The DICOM objects read as lesion annotations (their Modality)."""

    SEG = "SEG"
    RTSTRUCT = "RTSTRUCT"


ANNOTATION_MODALITIES = frozenset(k.value for k in AnnotationKind)
"""Modalities ingest reads as annotations rather than images."""


@dataclass(frozen=True)
class AnnotationRef:
    """An annotation's identity and what it references, from its header.

    Args:
        path: The file.
        kind: SEG or RTSTRUCT.
        sop_instance_uid: Its SOPInstanceUID.
        series_uid: Its own SeriesInstanceUID.
        study_uid: Its StudyInstanceUID.
        referenced_series: SeriesInstanceUIDs of the images it references.
        referenced_instances: SOPInstanceUIDs of the images it references.
    """

    path: Path
    kind: AnnotationKind
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    referenced_series: tuple[str, ...]
    referenced_instances: tuple[str, ...]


@dataclass(frozen=True)
class Annotation:
    """An annotation placed on an image's grid.

    Args:
        ref: What it is and references.
        mask: Boolean, in the layout of ``read_image(plan).array``.
        segments: The labels (SEG segment labels, RTSTRUCT ROI names) that made the mask.
    """

    ref: AnnotationRef
    mask: np.ndarray
    segments: tuple[str, ...]


@dataclass(frozen=True)
class SliceGeometry:
    """Where each slice of a planned image lies, in the plan's slice order.

    Args:
        sop_instance_uids: The SOPInstanceUID of each slice's file.
        frames: Each slice's frame index (0-based) in its file.
        positions: Each slice's ImagePositionPatient, or None (a projection image).
        pixel_spacing: The image's (row, column) spacing as its header states it, or None.
    """

    sop_instance_uids: tuple[str, ...]
    frames: tuple[int, ...]
    positions: tuple[tuple[float, float, float] | None, ...]
    pixel_spacing: tuple[float, float] | None

    def index(self) -> dict[tuple[str, int], int]:
        """Slice index by ``(SOPInstanceUID, 0-based frame)``."""
        return {(sop, f): k for k, (sop, f) in enumerate(zip(self.sop_instance_uids, self.frames, strict=True))}


def mask_file_name(image_key: str) -> str:
    """The workspace-relative file of an image's lesion mask: PHI-free, named by a hash of the image key.

    Args:
        image_key: The catalog's image key (series UID of a volume, SOP instance UID of a 2D image).

    Returns:
        ``annotations/<first 32 hex digits of SHA-256>.npz``.
    """
    return f"{ANNOTATIONS_DIR}/{hashlib.sha256(image_key.encode()).hexdigest()[:32]}.npz"


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a mask as a compressed ``.npz`` (uint8 array ``mask``) atomically: a temporary file, synced, renamed.

    Args:
        path: The final file (its folder is created).
        mask: The mask (any dtype; stored as uint8 0/1).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, mask=np.asarray(mask, bool).astype(np.uint8))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _unreadable(path: Path, message: str) -> DicomError:
    return DicomError(path, Reason.ANNOTATION_UNREADABLE, message)


def _geometry(path: Path, message: str) -> DicomError:
    return DicomError(path, Reason.ANNOTATION_GEOMETRY, message)


def _items(ds: Dataset | None, keyword: str) -> list[Dataset]:
    if ds is None:
        return []
    value = ds.get(keyword)
    return list(value) if value else []


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    items = _items(ds, keyword)
    return items[0] if items else None


def _uids(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(sorted({str(v).strip() for v in values if v is not None and str(v).strip()}))


def _read_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on corrupt headers
        raise _unreadable(path, f"the header cannot be read ({type(exc).__name__}); re-export the annotation") from exc


def read_annotation_ref(path: Path | str) -> AnnotationRef:
    """Read what an annotation file is and which images it references (no pixel data).

    Args:
        path: A SEG or RTSTRUCT file.

    Returns:
        Its identity and references.

    Raises:
        DicomError: The file's own reasons (not DICOM, unreadable, implausible size...), or
            ``annotation-unreadable``: not a SEG or RTSTRUCT, or it references no image.
    """
    path = Path(path)
    read_header(path)  # the checks every file gets: DICOM, inflation and declared size bounded by the bytes
    return _ref(path, _read_dataset(path))


def _ref(path: Path, ds: Dataset) -> AnnotationRef:
    """What the annotation header ``ds`` of ``path`` is and references (see :func:`read_annotation_ref`)."""
    try:
        return _parse_ref(path, ds)
    except DicomError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise _unreadable(path, f"a malformed reference ({type(exc).__name__}: {exc}); re-export the "
                                "annotation") from exc


def _parse_ref(path: Path, ds: Dataset) -> AnnotationRef:
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality not in ANNOTATION_MODALITIES:
        raise _unreadable(path, f"modality {modality or '(empty)'} is not an annotation (SEG or RTSTRUCT)")
    kind = AnnotationKind(modality)
    series: list[Any] = []
    instances: list[Any] = []
    if kind is AnnotationKind.SEG:
        for item in _items(ds, "ReferencedSeriesSequence"):
            series.append(item.get("SeriesInstanceUID"))
            instances += [i.get("ReferencedSOPInstanceUID") for i in _items(item, "ReferencedInstanceSequence")]
        for group in _items(ds, "PerFrameFunctionalGroupsSequence") + _items(ds, "SharedFunctionalGroupsSequence"):
            for derivation in _items(group, "DerivationImageSequence"):
                instances += [s.get("ReferencedSOPInstanceUID") for s in _items(derivation, "SourceImageSequence")]
        instances += [s.get("ReferencedSOPInstanceUID") for s in _items(ds, "SourceImageSequence")]
    else:
        for frame_ref in _items(ds, "ReferencedFrameOfReferenceSequence"):
            for study in _items(frame_ref, "RTReferencedStudySequence"):
                for item in _items(study, "RTReferencedSeriesSequence"):
                    series.append(item.get("SeriesInstanceUID"))
                    instances += [i.get("ReferencedSOPInstanceUID") for i in _items(item, "ContourImageSequence")]
        for roi in _items(ds, "ROIContourSequence"):
            for contour in _items(roi, "ContourSequence"):
                instances += [i.get("ReferencedSOPInstanceUID") for i in _items(contour, "ContourImageSequence")]
    ref = AnnotationRef(
        path=path, kind=kind, sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip(),
        series_uid=str(ds.get("SeriesInstanceUID", "")).strip(), study_uid=str(ds.get("StudyInstanceUID", "")).strip(),
        referenced_series=_uids(series), referenced_instances=_uids(instances),
    )
    if not ref.referenced_series and not ref.referenced_instances:
        what = "ReferencedSeriesSequence" if kind is AnnotationKind.SEG else "ReferencedFrameOfReferenceSequence"
        raise _unreadable(path, f"it references no image (no {what}); re-export it from the tool that drew it, "
                                "with its references to the source series")
    return ref


def slice_geometry(plan: ImagePlan, headers: Sequence[InstanceHeader] | None = None) -> SliceGeometry:
    """Where each slice of ``plan`` lies and which instance and frame it is.

    Args:
        plan: The image.
        headers: The headers of its series (the catalog's); read from the plan's files if None or incomplete.

    Returns:
        The slices' geometry in the plan's order.
    """
    by_path = {str(h.path): h for h in headers or ()}
    for p in plan.paths:
        if str(p) not in by_path:
            by_path[str(p)] = read_header(p)
    sops, frames, positions = [], [], []
    for s in plan.slices:
        h = by_path[str(s.path)]
        sops.append(h.sop_instance_uid)
        frames.append(s.frame)
        frame = h.frames[s.frame] if s.frame < len(h.frames) else None
        positions.append(frame.position if frame is not None else None)
    first = by_path[str(plan.slices[0].path)]
    return SliceGeometry(tuple(sops), tuple(frames), tuple(positions), first.pixel_spacing)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) and abs(v) <= MAX_POSITION_MM for v in out) else None


def _normal(orientation: Sequence[float]) -> np.ndarray:
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return normal / np.linalg.norm(normal)


class _Grid:
    """The image's slice planes, for placing frames and contours."""

    def __init__(self, path: Path, plan: ImagePlan, geo: SliceGeometry) -> None:
        self.path, self.plan, self.geo = path, plan, geo
        self.n = len(plan.slices)
        self.rows, self.cols = plan.shape[-2:]
        self.index = geo.index()
        self.single_frame = {sop for sop in geo.sop_instance_uids if geo.sop_instance_uids.count(sop) == 1}
        located = plan.orientation is not None and all(p is not None for p in geo.positions)
        self.located = located
        if located:
            assert plan.orientation is not None
            self.row_dir = np.asarray(plan.orientation[:3], float)
            self.col_dir = np.asarray(plan.orientation[3:], float)
            self.normal = _normal(plan.orientation)
            self.positions = np.array(geo.positions, float)
            self.along = self.positions @ self.normal
            self.row_sp, self.col_sp = plan.spacing[-2], plan.spacing[-1]
            self.step = plan.spacing[0] if plan.spatial_dims == 3 else min(self.row_sp, self.col_sp)

    def by_reference(self, refs: Sequence[tuple[str, int | None]]) -> set[int]:
        """Slices that ``(SOPInstanceUID, 1-based frame or None)`` references name."""
        out = set()
        for sop, frame in refs:
            if frame is None and sop in self.single_frame:
                out.add(self.index[(sop, self.geo.frames[self.geo.sop_instance_uids.index(sop)])])
            elif frame is not None and (sop, frame - 1) in self.index:
                out.add(self.index[(sop, frame - 1)])
        return out

    def by_position(self, point: np.ndarray, what: str, *, in_plane: bool) -> int:
        """The slice whose plane holds ``point`` (and, if ``in_plane``, whose origin it is).

        Raises:
            DicomError: ``annotation-geometry``: not on any slice's plane (or not at its origin).
        """
        along = float(point @ self.normal)
        k = int(np.argmin(np.abs(self.along - along)))
        off = along - float(self.along[k])
        if abs(off) > GEOMETRY_TOL * self.step:
            raise _geometry(self.path, f"{what} lies {off:+.2f} mm along the slice normal from the nearest slice "
                                       f"(slice {k + 1} of {self.n}; tolerance {GEOMETRY_TOL * self.step:.2f} mm): it "
                                       "was drawn on another series or reconstruction; export it again on this series")
        if in_plane:
            d = point - self.positions[k]
            dc, dr = float(d @ self.row_dir) / self.col_sp, float(d @ self.col_dir) / self.row_sp
            if max(abs(dc), abs(dr)) > GEOMETRY_TOL:
                raise _geometry(self.path, f"{what} is shifted {dr:+.2f} rows, {dc:+.2f} columns from slice {k + 1}'s "
                                           "origin: its grid is not the image's; export it again on this series")
        return k

    def to_pixels(self, points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, column) of patient points on slice ``k``."""
        d = points - self.positions[k]
        return d @ self.col_dir / self.row_sp, d @ self.row_dir / self.col_sp


def read_annotation(path: Path | str, plan: ImagePlan, *, headers: Sequence[InstanceHeader] | None = None
                    ) -> Annotation:
    """Read a SEG or RTSTRUCT onto the grid of ``plan``.

    Args:
        path: The annotation file.
        plan: The image it marks (from the catalog or :func:`imaging.dicom.plan_images`).
        headers: The headers of the image's series, if at hand (else read from its files).

    Returns:
        The annotation with its mask in the layout of ``read_image(plan).array``.

    Raises:
        DicomError: ``annotation-geometry`` (its grid is not the image's), ``annotation-unreadable`` (malformed,
            unsupported, no lesion segment or ROI, a declared size beyond the bounds), or the file's own reasons.
    """
    path = Path(path)
    read_header(path)
    ds = _read_dataset(path)
    ref = _ref(path, ds)
    grid = _Grid(path, plan, slice_geometry(plan, headers))
    try:
        if ref.kind is AnnotationKind.SEG:
            mask, labels = _seg_mask(path, ds, grid)
        else:
            mask, labels = _rtstruct_mask(path, ds, grid)
    except DicomError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise _unreadable(path, f"a malformed value ({type(exc).__name__}: {exc}); re-export the annotation") from exc
    return Annotation(ref=ref, mask=mask[0] if plan.spatial_dims == 2 else mask, segments=labels)


# -- SEG -------------------------------------------------------------------------------------------------------


def _code(item: Dataset | None) -> tuple[str, str]:
    """(CodeValue, CodeMeaning) of a code item (empty strings if absent)."""
    if item is None:
        return "", ""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    return str(value).strip(), str(item.get("CodeMeaning", "")).strip()


def _names_lesion(*texts: str) -> bool:
    return any(word in text.lower() for text in texts for word in LESION_WORDS)


def _lesion_segments(path: Path, segments: list[Dataset]) -> dict[int, str]:
    """Segment number -> label of the segments that mark a lesion (see the module's rule).

    Raises:
        DicomError: ``annotation-unreadable`` (no segment marks a lesion) or ``annotation-automatic`` (every one
            that does was made by an algorithm).
    """
    lesion: dict[int, str] = {}
    other: dict[int, str] = {}
    automatic: set[int] = set()
    for seg in segments:
        number = int(seg.SegmentNumber)
        label = str(seg.get("SegmentLabel", "")).strip() or f"segment {number}"
        category, _ = _code(_first(seg, "SegmentedPropertyCategoryCodeSequence"))
        _, meaning = _code(_first(seg, "SegmentedPropertyTypeCodeSequence"))
        if str(seg.get("SegmentAlgorithmType", "")).strip().upper() == "AUTOMATIC":
            automatic.add(number)
        if category in LESION_CATEGORIES or _names_lesion(label, meaning):
            lesion[number] = label
        elif category not in ANATOMY_CATEGORIES:
            other[number] = label
    candidates = lesion or other
    if not candidates:
        names = ", ".join(str(s.get("SegmentLabel", "?")) for s in segments[:5])
        raise _unreadable(path, f"none of its {len(segments)} segment(s) marks a lesion ({names}: anatomy); a lesion "
                                "segment has category Morphologically Altered Structure or a label naming the lesion")
    chosen = {n: label for n, label in candidates.items() if n not in automatic}
    if not chosen:
        raise DicomError(path, Reason.ANNOTATION_AUTOMATIC,
                         "its lesion segment(s) were made by an algorithm (SegmentAlgorithmType AUTOMATIC), e.g. a "
                         "model's prediction stored in the PACS: not a reference annotation, so not used; a reviewed "
                         "version (MANUAL or SEMIAUTOMATIC) would be")
    return chosen


def _frame_value(group: Dataset | None, shared: Dataset | None, seq: str, keyword: str) -> Any:
    for source in (group, shared):
        item = _first(source, seq)
        if item is not None and item.get(keyword) is not None:
            return item.get(keyword)
    return None


def _frame_refs(group: Dataset | None, shared: Dataset | None) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for source in (group, shared):
        for derivation in _items(source, "DerivationImageSequence"):
            for src in _items(derivation, "SourceImageSequence"):
                sop = str(src.get("ReferencedSOPInstanceUID", "")).strip()
                numbers = src.get("ReferencedFrameNumber")
                if not sop:
                    continue
                if numbers is None or numbers == "":
                    out.append((sop, None))
                else:
                    values = numbers if isinstance(numbers, pydicom.multival.MultiValue) else [numbers]
                    out += [(sop, int(v)) for v in values]
        if out:
            break
    return out


def _check_seg_size(path: Path, ds: Dataset, grid: _Grid, n_frames: int, n_segments: int, bits: int) -> None:
    """Bound memory before decoding: frames x rows x columns against the image and the bytes on disk."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    if (rows, cols) != (grid.rows, grid.cols):
        raise _geometry(path, f"its frames are {rows}x{cols}, the image is {grid.rows}x{grid.cols}: it was drawn on "
                              "another series or a resampled copy; export it again on this series")
    if n_frames < 1:
        raise _unreadable(path, f"NumberOfFrames = {n_frames}: a segmentation has at least one frame")
    most = max(1, n_segments) * grid.n
    if n_frames > most or n_frames * rows * cols > MAX_ANNOTATION_VOXELS:
        raise _unreadable(path, f"it declares {n_frames} frames of {rows}x{cols}: more than one frame per segment and "
                                f"slice ({most}) or {MAX_ANNOTATION_VOXELS:,} voxels; the header is wrong or the file "
                                "is hostile; re-export it")
    size = path.stat().st_size
    declared = (n_frames * rows * cols * bits + 7) // 8
    syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if syntax in UNCOMPRESSED and declared > size:
        raise DicomError(path, Reason.TRUNCATED_PIXEL_DATA,
                         f"{n_frames} frames of {rows}x{cols} need {declared:,} bytes; the file holds {size:,}: it was "
                         "cut short; copy it again")
    if syntax not in UNCOMPRESSED and declared > max(MAX_COMPRESSION_RATIO * size, SMALL_IMAGE_BYTES):
        raise DicomError(path, Reason.IMPLAUSIBLE_SIZE,
                         f"{n_frames} frames of {rows}x{cols} would decode to more than {MAX_COMPRESSION_RATIO}x the "
                         "file: the header is wrong or the file is hostile; re-export it")


def _check_seg_plane(path: Path, shared: Dataset | None, grid: _Grid) -> None:
    """Pixel spacing and orientation (shared functional groups) against the image's."""
    spacing = _floats(_frame_value(None, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
    reference = grid.plan.spacing[-2:] if grid.located else grid.geo.pixel_spacing
    if spacing is not None and reference is not None:
        for axis, (a, b, n) in enumerate(zip(spacing, reference, (grid.rows, grid.cols), strict=True)):
            if abs(a - b) * n > GEOMETRY_TOL * b:  # the error adds up over the image: 0.1 pixel at the far edge
                what = "row" if axis == 0 else "column"
                raise _geometry(path, f"its {what} spacing is {a:g} mm, the image's {b:g} mm: it was drawn on a "
                                      "resampled copy; export it again on this series")
    orientation = _floats(_frame_value(None, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if orientation is not None and grid.plan.orientation is not None:
        diff = float(np.abs(np.asarray(orientation) - np.asarray(grid.plan.orientation)).max())
        if diff > ORIENTATION_TOL:
            raise _geometry(path, f"its ImageOrientationPatient {list(orientation)} is not the image's "
                                  f"{list(grid.plan.orientation)}: drawn on another reconstruction; export it again on "
                                  "this series")


def _seg_slice(path: Path, i: int, group: Dataset | None, shared: Dataset | None, grid: _Grid) -> int:
    """The slice frame ``i`` (0-based) of a SEG lies on."""
    what = f"frame {i + 1}"
    orientation = _floats(_frame_value(group, None, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    if orientation is not None and grid.plan.orientation is not None and \
            float(np.abs(np.asarray(orientation) - np.asarray(grid.plan.orientation)).max()) > ORIENTATION_TOL:
        raise _geometry(path, f"{what} has orientation {list(orientation)}, not the image's; export it again on this "
                              "series")
    position = _floats(_frame_value(group, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
    refs = _frame_refs(group, shared)
    named = grid.by_reference(refs)
    if position is not None and grid.located:
        k = grid.by_position(np.asarray(position), what, in_plane=True)
        if named and k not in named:
            j = min(named)
            raise _geometry(path, f"{what} lies on slice {k + 1} but references the instance of slice {j + 1}: its "
                                  "positions and references disagree (shifted by "
                                  f"{k - j:+d} slices); export it again on this series")
        return k
    if len(named) == 1:
        return named.pop()
    if not refs and position is None and grid.n == 1:
        return 0
    if refs and not named:
        raise _geometry(path, f"{what} references an instance ({refs[0][0]}) that is not a slice of this image and has "
                              "no position on it")
    raise _unreadable(path, f"{what} has no ImagePositionPatient and no single source image reference: it cannot "
                            "be placed on the image")


def _seg_mask(path: Path, ds: Dataset, grid: _Grid) -> tuple[np.ndarray, tuple[str, ...]]:
    seg_type = str(ds.get("SegmentationType", "")).strip().upper()
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise _unreadable(path, f"SegmentationType {seg_type or '(empty)'} is not BINARY, FRACTIONAL or LABELMAP")
    segments = _items(ds, "SegmentSequence")
    if not segments:
        raise _unreadable(path, "it has no segments (empty SegmentSequence): nothing is marked; export it again")
    numbers = {int(s.SegmentNumber) for s in segments}
    chosen = _lesion_segments(path, segments)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 1) or 1)
    _check_seg_size(path, ds, grid, n_frames, 1 if seg_type == "LABELMAP" else len(segments), bits)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence")
    if len(per_frame) not in (0, n_frames):
        raise _unreadable(path, f"{len(per_frame)} per-frame functional groups for {n_frames} frames")
    _check_seg_plane(path, shared, grid)
    targets: dict[int, int] = {}  # frame index -> slice
    for i in range(n_frames):
        group = per_frame[i] if per_frame else None
        if seg_type != "LABELMAP":
            number = _frame_value(group, shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            if number is None or int(number) not in numbers:
                raise _unreadable(path, f"frame {i + 1} references segment {number}, which the SegmentSequence does "
                                        "not describe")
            if int(number) not in chosen:
                continue
        targets[i] = _seg_slice(path, i, group, shared, grid)
    mask = np.zeros((grid.n, grid.rows, grid.cols), bool)
    if targets:
        top = float(ds.get("MaximumFractionalValue", 255) or 255)
        wanted = np.array(sorted(chosen), dtype=np.int64)
        indices = sorted(targets)
        try:
            frames = pydicom.pixels.iter_pixels(path, indices=indices)
            for i, frame in zip(indices, frames, strict=True):
                frame = np.asarray(frame).reshape(grid.rows, grid.cols)
                if seg_type == "BINARY":
                    on = frame != 0
                elif seg_type == "FRACTIONAL":
                    on = frame.astype(np.float64) >= 0.5 * top
                else:
                    on = np.isin(frame, wanted)
                mask[targets[i]] |= on
        except DicomError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoder plugins raise many kinds
            raise _unreadable(path, f"its frames cannot be decoded ({type(exc).__name__}: {exc}); re-export it "
                                    "uncompressed") from exc
    return mask, tuple(chosen[n] for n in sorted(chosen))


# -- RT Structure Set ------------------------------------------------------------------------------------------


def _lesion_rois(path: Path, ds: Dataset) -> dict[int, str]:
    """ROI number -> name of the ROIs that mark a lesion (see the module's rule)."""
    names = {int(r.ROINumber): str(r.get("ROIName", "")).strip() or f"ROI {r.ROINumber}"
             for r in _items(ds, "StructureSetROISequence")}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "")).strip().upper()
             for o in _items(ds, "RTROIObservationsSequence") if o.get("ReferencedROINumber") is not None}
    contoured = {int(r.ReferencedROINumber) for r in _items(ds, "ROIContourSequence") if _items(r, "ContourSequence")}
    if not contoured:
        raise _unreadable(path, "it holds no contour (empty ROIContourSequence): nothing is marked; export it again")
    lesion = {n: names.get(n, f"ROI {n}") for n in contoured
              if types.get(n, "") in LESION_ROI_TYPES or _names_lesion(names.get(n, ""))}
    other = {n: names.get(n, f"ROI {n}") for n in contoured if types.get(n, "") not in NON_LESION_ROI_TYPES}
    chosen = lesion or other
    if not chosen:
        listed = ", ".join(f"{names.get(n, n)} ({types.get(n, '')})" for n in sorted(contoured)[:5])
        raise _unreadable(path, f"none of its contoured ROIs marks a lesion ({listed}); a lesion ROI has the "
                                "interpreted type GTV or a name naming the lesion")
    return chosen


def polygon_mask(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The pixel centres inside or on a closed polygon, by the even-odd rule.

    Args:
        shape: ``(rows, cols)`` of the slice.
        rows: The polygon's vertices' fractional row indices.
        cols: Their column indices.

    Returns:
        A boolean mask of ``shape``.
    """
    from matplotlib.path import Path as PolygonPath

    out = np.zeros(shape, bool)
    if len(rows) < 3:
        return out
    r0, r1 = max(0, math.floor(float(rows.min()))), min(shape[0] - 1, math.ceil(float(rows.max())))
    c0, c1 = max(0, math.floor(float(cols.min()))), min(shape[1] - 1, math.ceil(float(cols.max())))
    if r0 > r1 or c0 > c1:
        return out
    rr, cc = np.mgrid[r0:r1 + 1, c0:c1 + 1]
    points = np.column_stack([cc.ravel(), rr.ravel()]).astype(float)
    verts = np.column_stack([cols, rows]).astype(float)
    inside = PolygonPath(np.vstack([verts, verts[:1]]), closed=True).contains_points(points)
    # Centres on an edge (within a thousandth of a pixel) count as inside, whatever side the test puts them.
    a, b = verts, np.roll(verts, -1, axis=0)
    ab = b - a
    length2 = np.maximum((ab**2).sum(axis=1), 1e-12)
    chunk = max(1, 2_000_000 // max(1, len(points)))
    for s in range(0, len(a), chunk):
        ap = points[:, None, :] - a[None, s:s + chunk]
        t = np.clip((ap * ab[None, s:s + chunk]).sum(axis=2) / length2[None, s:s + chunk], 0.0, 1.0)
        nearest = ap - t[..., None] * ab[None, s:s + chunk]
        inside |= ((nearest**2).sum(axis=2) <= 1e-6).any(axis=1)
    out[r0:r1 + 1, c0:c1 + 1] = inside.reshape(rr.shape)
    return out


def _rtstruct_mask(path: Path, ds: Dataset, grid: _Grid) -> tuple[np.ndarray, tuple[str, ...]]:
    chosen = _lesion_rois(path, ds)
    if not grid.located:
        raise _geometry(path, "the image has no patient position and orientation (a projection image): an RT "
                              "Structure Set's contours cannot be placed on it; use a DICOM SEG")
    mask = np.zeros((grid.n, grid.rows, grid.cols), bool)
    for roi in _items(ds, "ROIContourSequence"):
        if int(roi.ReferencedROINumber) not in chosen:
            continue
        filled: dict[int, np.ndarray] = {}
        for j, contour in enumerate(_items(roi, "ContourSequence")):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).strip().upper() != "CLOSED_PLANAR":
                continue  # points and open contours enclose nothing
            what = f"contour {j + 1} of ROI {chosen[int(roi.ReferencedROINumber)]!r}"
            data = [float(v) for v in (contour.get("ContourData") or [])]
            if len(data) % 3 or not data or not all(math.isfinite(v) and abs(v) <= MAX_POSITION_MM for v in data):
                raise _unreadable(path, f"{what}: ContourData is not a list of finite x, y, z triplets")
            points = np.asarray(data, float).reshape(-1, 3)
            ks = {grid.by_position(p, what, in_plane=False) for p in points}
            if len(ks) != 1:
                raise _geometry(path, f"{what} crosses slices {sorted(k + 1 for k in ks)[:4]}: a planar contour lies "
                                      "on one slice plane")
            k = ks.pop()
            refs = [(str(i.get("ReferencedSOPInstanceUID", "")).strip(),
                     int(i.ReferencedFrameNumber) if i.get("ReferencedFrameNumber") else None)
                    for i in _items(contour, "ContourImageSequence")]
            named = grid.by_reference(refs)
            if named and k not in named:
                raise _geometry(path, f"{what} lies on slice {k + 1} but references the instance of slice "
                                      f"{min(named) + 1}; export it again on this series")
            rows, cols = grid.to_pixels(points, k)
            fill = polygon_mask((grid.rows, grid.cols), rows, cols)
            filled[k] = filled[k] ^ fill if k in filled else fill  # even-odd: a contour inside another is a hole
        for k, fill in filled.items():
            mask[k] |= fill
    return mask, tuple(chosen[n] for n in sorted(chosen))
