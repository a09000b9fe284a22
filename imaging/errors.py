"""Why a file or series was not accepted, as stable codes that tools can read."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

__all__ = ["DicomError", "Reason"]


class Reason(StrEnum):
    """Stable reason codes for rejected files, series, images and annotations (they appear in ``--json`` output)."""

    NOT_DICOM = "not-dicom"
    DICOMDIR = "dicomdir"  # an index of a media set, read for the files it lists
    UNREADABLE = "unreadable"
    MISSING_UID = "missing-uid"
    DUPLICATE_INSTANCE = "duplicate-instance"
    MISSING_FILE = "missing-file"
    NOT_AN_IMAGE = "not-an-image"
    MODALITY_UNUSED = "modality-unused"
    COLOUR_IMAGE = "colour-image"
    TRUNCATED_PIXEL_DATA = "truncated-pixel-data"
    UNDECODABLE_PIXEL_DATA = "undecodable-pixel-data"
    MISSING_GEOMETRY = "missing-geometry"
    MIXED_ORIENTATION = "mixed-orientation"
    MIXED_SIZE = "mixed-size"
    DUPLICATE_SLICE_POSITION = "duplicate-slice-position"
    MISSING_SLICE = "missing-slice"
    UNEVEN_SPACING = "uneven-spacing"
    SHEARED_GEOMETRY = "sheared-geometry"
    TOO_FEW_SLICES = "too-few-slices"
    IMPLAUSIBLE_SIZE = "implausible-size"  # declared sizes the bytes on disk cannot hold
    INVALID_GEOMETRY = "invalid-geometry"  # a spacing, position or orientation that is not finite and sane
    INVALID_RESCALE = "invalid-rescale"  # a rescale slope or intercept that is not finite and sane
    MIXED_SERIES = "mixed-series"  # one SeriesInstanceUID over several studies or modalities
    CORRUPT_CODESTREAM = "corrupt-codestream"  # compressed frames whose structure contradicts the header
    SIGNATURE_MISMATCH = "signature-mismatch"  # a DICOM digital signature that no longer matches the content
    SYMLINK = "symlink-not-followed"  # a link in the source folder: not followed (it may point outside it)
    # Lesion annotations (DICOM SEG and RT Structure Sets), matched to the image they mark:
    ANNOTATION_UNREFERENCED = "annotation-unreferenced"  # the image it references is not in the catalog (or rejected)
    ANNOTATION_GEOMETRY = "annotation-geometry"  # its grid is not the image's: size, spacing, orientation or positions
    ANNOTATION_UNREADABLE = "annotation-unreadable"  # malformed or unsupported: no segment, no contour, bad values
    ANNOTATION_AUTOMATIC = "annotation-automatic"  # a SEG made by an algorithm (a model's prediction), not a reference


class DicomError(Exception):
    """A DICOM file or series that cannot be used, with the reason and what to do.

    Args:
        path: The file (or the first file of the series) the problem was found in.
        reason: The stable reason code.
        message: A sentence for a person: what is wrong and how to fix it.
    """

    def __init__(self, path: Path | str, reason: Reason, message: str) -> None:
        self.path = Path(path)
        self.reason = reason
        self.message = message
        super().__init__(f"{self.path}: {reason}: {message}")
