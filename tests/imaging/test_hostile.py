"""Hostile and broken DICOM: declared sizes the bytes on disk cannot hold, values that are not finite or not
sane, series that mix studies or modalities. Each is a clean reject with its reason; the good series
beside it is ingested; nothing allocates what the file does not hold."""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_series
from pydicom.uid import JPEG2000Lossless

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.summary import series_listing


def _set(**values: object) -> Callable[[pydicom.Dataset], None]:
    def mutate(ds: pydicom.Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _compressed_claiming(rows: int, cols: int) -> Callable[[pydicom.Dataset], None]:
    """A compressed file whose header claims a huge image (the pixel data stays tiny)."""
    def mutate(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.Rows, ds.Columns = rows, cols
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])

    return mutate


HOSTILE: dict[str, tuple[Callable[[pydicom.Dataset], None], str, str]] = {
    # name: (what is done to one slice, where it is rejected, the reason)
    "frames-2^31": (_set(NumberOfFrames=2147483647), "file", "truncated-pixel-data"),
    "frames-negative": (_set(NumberOfFrames=-5), "file", "implausible-size"),
    "rows-65535": (_set(Rows=65535, Columns=65535), "file", "truncated-pixel-data"),
    "j2k-claiming-8gib": (_compressed_claiming(65535, 65535), "file", "implausible-size"),
    "spacing-nan": (_set(PixelSpacing=["NaN", "0.7"]), "series", "invalid-geometry"),
    "spacing-inf": (_set(PixelSpacing=["inf", "0.7"]), "series", "invalid-geometry"),
    "spacing-1e300": (_set(PixelSpacing=["1e300", "0.7"]), "series", "invalid-geometry"),
    "position-nan": (_set(ImagePositionPatient=["NaN", "0", "0"]), "series", "invalid-geometry"),
    "orientation-zeros": (_set(ImageOrientationPatient=[0, 0, 0, 0, 0, 0]), "series", "invalid-geometry"),
    "orientation-nan": (_set(ImageOrientationPatient=["NaN", 0, 0, 0, 1, 0]), "series", "invalid-geometry"),
    "orientation-parallel": (_set(ImageOrientationPatient=[1, 0, 0, 1, 0, 0]), "series", "invalid-geometry"),
    "slope-nan": (_set(RescaleSlope="NaN"), "series", "invalid-rescale"),
    "slope-zero": (_set(RescaleSlope=0), "series", "invalid-rescale"),
    "intercept-1e309": (_set(RescaleIntercept="1e309"), "series", "invalid-rescale"),
    "other-study": (_set(StudyInstanceUID="1.2.826.0.1.3680043.8.498.99"), "series", "mixed-series"),
    "one-mr-slice": (_set(Modality="MR"), "series", "mixed-series"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_input_is_a_clean_reject_with_its_reason(tmp_path: Path, name: str) -> None:
    mutate, level, reason = HOSTILE[name]
    src = tmp_path / "dicom"
    write_series(src / "good", n=20, patient_id="GOOD", seed=99)
    paths, _, series_uid = write_series(src / name, n=20, patient_id="BAD", seed=3)
    ds = pydicom.dcmread(paths[7])
    mutate(ds)
    ds.save_as(paths[7])
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        listing = series_listing(catalog)
    assert report.series_ok >= 1  # the good series beside it is ingested
    if level == "file":
        (bad,) = [r for r in listing["rejected_files"] if Path(r["path"]).name == paths[7].name]
        assert bad["reason"] == reason, bad["message"]
        # Without the slice the rest of its series is incomplete: rejected, never silently shortened.
        (rest,) = [s for s in listing["series"] if s["series_instance_uid"] == series_uid]
        assert rest["status"] == "rejected" and rest["reason"] == "missing-slice"
    else:
        hit = [s for s in listing["series"] if s["reason"] == reason]
        assert hit and all(s["status"] == "rejected" for s in hit), [(s["reason"], s["message"]) for s in
                                                                      listing["series"]]
        assert all(s["status"] == "ok" for s in listing["series"] if s["reason"] != reason)


def test_all_at_once_peak_memory_stays_small_and_only_the_good_series_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src / "good", n=20, patient_id="GOOD", seed=99)
    for i, (mutate, _, _) in enumerate(HOSTILE.values()):
        paths, _, _ = write_series(src / f"bad-{i}", n=20, patient_id=f"P{i}", seed=i)
        ds = pydicom.dcmread(paths[7])
        mutate(ds)
        ds.save_as(paths[7])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert report.series_ok == 1 and report.series_rejected == len(HOSTILE)
    # 2^31 frames, 65535 x 65535 pixels and an 8 GiB JPEG 2000 claim: checked before anything is allocated.
    assert grown_mib < 300, f"ingest grew the peak RSS by {grown_mib:.0f} MiB"


def _deflate_bomb(path: Path, inflated_bytes: int) -> None:
    """A Deflated Explicit VR Little Endian file whose pixel data inflates to ``inflated_bytes`` of zeros."""
    import struct
    import zlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.SamplesPerPixel = 8, 8, 16, 1
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM" + head.getvalue())
        fh.write(squeeze.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)))
        zeros = b"\x00" * (1 << 20)
        for _ in range(inflated_bytes >> 20):
            fh.write(squeeze.compress(zeros))
        fh.write(squeeze.flush())


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path: Path, pydicom_files: Path) -> None:
    from imaging.dicom import read_header
    from imaging.errors import DicomError

    bomb = tmp_path / "bomb.dcm"
    _deflate_bomb(bomb, 2 << 30)  # 2 GiB of zeros in about 2 MB
    assert bomb.stat().st_size < 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DicomError) as info:
        read_header(bomb)
    assert info.value.reason == "implausible-size" and "inflates past" in info.value.message
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    # A real deflated file still reads.
    assert read_header(pydicom_files / "image_dfl.dcm").rows > 0
