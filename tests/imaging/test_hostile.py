"""Hostile and broken DICOM (``imaging.hostile``): declared sizes the bytes on disk cannot hold, values that are
not finite or not sane, series that mix studies or modalities, a deflate bomb. Each is a clean reject with its
reason; the good series beside it is ingested; nothing allocates what the file does not hold."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
from dicom_factory import write_series

from imaging.catalog import Catalog
from imaging.dicom import read_header
from imaging.errors import DicomError
from imaging.hostile import VARIANTS, Variant, apply, write_deflate_bomb
from imaging.ingest import ingest_folder
from imaging.summary import series_listing


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_each_hostile_input_is_a_clean_reject_with_its_reason(tmp_path: Path, variant: Variant) -> None:
    src = tmp_path / "dicom"
    write_series(src / "good", n=20, patient_id="GOOD", seed=99)
    paths, _, series_uid = write_series(src / variant.name, n=20, patient_id="BAD", seed=3)
    apply(variant, paths[7])
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        listing = series_listing(catalog)
    assert report.series_ok >= 1  # the good series beside it is ingested
    if variant.level == "file":
        (bad,) = [r for r in listing["rejected_files"] if Path(r["path"]).name == paths[7].name]
        assert bad["reason"] == variant.reason, bad["message"]
        # Without the slice the rest of its series is incomplete: rejected, never silently shortened.
        (rest,) = [s for s in listing["series"] if s["series_instance_uid"] == series_uid]
        assert rest["status"] == "rejected" and rest["reason"] == "missing-slice"
    else:
        hit = [s for s in listing["series"] if s["reason"] == variant.reason]
        assert hit and all(s["status"] == "rejected" for s in hit), [(s["reason"], s["message"]) for s in
                                                                      listing["series"]]
        assert all(s["status"] == "ok" for s in listing["series"] if s["reason"] != variant.reason)


def test_all_at_once_peak_memory_stays_small_and_only_the_good_series_is_kept(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    write_series(src / "good", n=20, patient_id="GOOD", seed=99)
    for i, variant in enumerate(VARIANTS):
        paths, _, _ = write_series(src / variant.name, n=20, patient_id=f"P{i}", seed=i)
        apply(variant, paths[7])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert report.series_ok == 1 and report.series_rejected == len(VARIANTS)
    # 2^31 frames, 65535 x 65535 pixels and an 8 GiB JPEG 2000 claim: checked before anything is allocated.
    assert grown_mib < 300, f"ingest grew the peak RSS by {grown_mib:.0f} MiB"


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path: Path, pydicom_files: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    write_deflate_bomb(bomb, 2 << 30)  # 2 GiB of zeros in about 2 MB
    assert bomb.stat().st_size < 4 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DicomError) as info:
        read_header(bomb)
    assert info.value.reason == "implausible-size" and "inflates past" in info.value.message
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200
    # A real deflated file still reads.
    assert read_header(pydicom_files / "image_dfl.dcm").rows > 0
