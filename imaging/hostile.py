"""Malformed and hostile variants of a DICOM file, for checking that ingest rejects each one cleanly.

Each :class:`Variant` changes one slice of a good series the way a broken export or an attacker would:
declared sizes the bytes on disk cannot hold, values that are not finite or not sane, a slice from
another study or modality. What ingest must do with it is part of the variant: reject the file or the
series with a stable reason, keep every other series, and allocate nothing the file does not hold. The
tests (``tests/imaging/test_hostile.py``) and ``scripts/bench_hostile.py`` use the same list.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from imaging.errors import Reason

__all__ = ["VARIANTS", "Variant", "apply", "write_deflate_bomb"]


@dataclass(frozen=True)
class Variant:
    """One hostile change to one slice of a series.

    Attributes:
        name: A short name.
        mutate: Changes the slice's dataset in place.
        level: ``file`` if the slice itself is rejected, ``series`` if its series is.
        reason: The reason ingest must give.
    """

    name: str
    mutate: Callable[[Dataset], None]
    level: str
    reason: Reason


def _set(**values: object) -> Callable[[Dataset], None]:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _compressed_claiming(rows: int, cols: int) -> Callable[[Dataset], None]:
    """Compressed pixel data of 64 bytes whose header claims a ``rows`` x ``cols`` image."""
    def mutate(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = encapsulate([b"\x00" * 64])

    return mutate


def _rle_damaged(cut: int | None, segments: int | None) -> Callable[[Dataset], None]:
    """The slice compressed as RLE Lossless, then its frame cut to ``cut`` bytes or its segment count changed."""
    def mutate(ds: Dataset) -> None:
        ds.compress(RLELossless)
        frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        if segments is not None:
            frame[0] = segments
        ds.PixelData = encapsulate([bytes(frame[:cut])])

    return mutate


VARIANTS: tuple[Variant, ...] = (
    Variant("frames-2^31", _set(NumberOfFrames=2147483647), "file", Reason.TRUNCATED_PIXEL_DATA),
    Variant("frames-negative", _set(NumberOfFrames=-5), "file", Reason.IMPLAUSIBLE_SIZE),
    Variant("rows-65535", _set(Rows=65535, Columns=65535), "file", Reason.TRUNCATED_PIXEL_DATA),
    Variant("j2k-claiming-8gib", _compressed_claiming(65535, 65535), "file", Reason.IMPLAUSIBLE_SIZE),
    Variant("spacing-nan", _set(PixelSpacing=["NaN", "0.7"]), "series", Reason.INVALID_GEOMETRY),
    Variant("spacing-inf", _set(PixelSpacing=["inf", "0.7"]), "series", Reason.INVALID_GEOMETRY),
    Variant("spacing-1e300", _set(PixelSpacing=["1e300", "0.7"]), "series", Reason.INVALID_GEOMETRY),
    Variant("position-nan", _set(ImagePositionPatient=["NaN", "0", "0"]), "series", Reason.INVALID_GEOMETRY),
    Variant("orientation-zeros", _set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]), "series", Reason.INVALID_GEOMETRY),
    Variant("orientation-nan", _set(ImageOrientationPatient=["NaN", 0, 0, 0, 1, 0]), "series",
            Reason.INVALID_GEOMETRY),
    Variant("orientation-parallel", _set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]), "series",
            Reason.INVALID_GEOMETRY),
    Variant("slope-nan", _set(RescaleSlope="NaN"), "series", Reason.INVALID_RESCALE),
    Variant("slope-zero", _set(RescaleSlope=0), "series", Reason.INVALID_RESCALE),
    Variant("intercept-1e309", _set(RescaleIntercept="1e309"), "series", Reason.INVALID_RESCALE),
    Variant("other-study", _set(StudyInstanceUID="1.2.826.0.1.3680043.8.498.99"), "series", Reason.MIXED_SERIES),
    Variant("one-mr-slice", _set(Modality="MR"), "series", Reason.MIXED_SERIES),
    Variant("rle-header-cut", _rle_damaged(40, None), "series", Reason.CORRUPT_CODESTREAM),
    Variant("rle-segments", _rle_damaged(None, 3), "series", Reason.CORRUPT_CODESTREAM),
)


def apply(variant: Variant, path: Path) -> None:
    """Rewrite the DICOM file at ``path`` with ``variant``'s change."""
    ds = pydicom.dcmread(path)
    variant.mutate(ds)
    ds.save_as(path)


def write_deflate_bomb(path: Path, inflated_bytes: int) -> None:
    """A Deflated Explicit VR Little Endian CT file whose pixel data inflates to ``inflated_bytes`` of zeros
    (2 GiB take about 2 MB on disk). Written in chunks: nothing near that size is held in memory."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 8, 8, 16, 1
    body, head = DicomBytesIO(), DicomBytesIO()
    for buffer in (body, head):
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(body, ds)
    write_file_meta_info(head, meta)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = b"\x00" * (1 << 20)
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM" + head.getvalue())
        fh.write(squeeze.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)))
        for _ in range(inflated_bytes >> 20):
            fh.write(squeeze.compress(zeros))
        fh.write(squeeze.flush())
