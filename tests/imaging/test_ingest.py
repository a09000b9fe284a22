"""Ingest into a real SQLite catalog: rejects with reasons, nothing lost, fast re-ingest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dicom_factory import write_enhanced, write_mammogram, write_series

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder, walk_files
from imaging.summary import series_listing


def _series_by_status(catalog: Catalog) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in series_listing(catalog)["series"]:
        out.setdefault(s["status"], []).append(s)
    return out


def test_pydicom_test_files_every_file_accounted_for(pydicom_files: Path, tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, pydicom_files)
        on_disk = {str(p) for p, _ in walk_files(pydicom_files.resolve())}
        in_catalog = {r[0] for r in catalog.db.execute("SELECT path FROM files")}
        assert on_disk <= in_catalog, "every file under the source has a row"
        assert report.files_seen == len(on_disk)
        reasons = {Path(r["path"]).name: r["reason"] for r in series_listing(catalog)["rejected_files"]}
        series = series_listing(catalog)["series"]
    assert reasons["README.txt"] == "not-dicom"
    assert reasons["badVR.dcm"] == "unreadable"
    assert reasons["MR_small_RLE.dcm"] == "duplicate-instance"  # a twin of MR_small: same SOP instance
    modality_unused = {s["modality"] for s in series if s["reason"] == "modality-unused"}
    assert {"CR", "US", "OT"} <= modality_unused  # the DICOMDIR set's CR images, ultrasound, secondary capture
    assert any(s["reason"] == "not-an-image" and s["modality"] == "SR" for s in series)
    assert any(s["reason"] == "too-few-slices" and s["modality"] == "CT" for s in series)


def _site(tmp_path: Path) -> Path:
    """A folder with three good series, a truncated series, a mammogram and a text file."""
    src = tmp_path / "dicom"
    write_series(src / "good-ct", n=20, patient_id="P1", seed=1)
    write_series(src / "good-mr", n=12, modality="MR", intercept=0.0, patient_id="P2", seed=2)
    write_enhanced(src / "enhanced")
    write_mammogram(src / "mg")
    paths, _, _ = write_series(src / "truncated-ct", n=20, patient_id="P3", seed=4)
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[: len(data) - 40])
    (src / "notes.txt").write_text("hello")
    return src


def test_one_bad_series_does_not_stop_the_others(tmp_path: Path) -> None:
    src = _site(tmp_path)
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        by_status = _series_by_status(catalog)
    assert report.series_ok == 4 and report.series_rejected == 1
    (bad,) = by_status["rejected"]
    assert bad["reason"] == "truncated-pixel-data" and "cut short" in bad["message"]
    shapes = sorted(tuple(s["shape"]) for s in by_status["ok"])
    assert shapes == sorted([(12, 10), (12, 8, 6), (20, 8, 6), (20, 8, 6)])
    assert report.rejected["file:not-dicom"] == 1


def test_reingest_of_unchanged_folder_reads_and_decodes_nothing(tmp_path: Path) -> None:
    src = _site(tmp_path)
    with Catalog.open(tmp_path / "ws") as catalog:
        first = ingest_folder(catalog, src)
        assert first.images_decoded == 5
        again = ingest_folder(catalog, src)
        assert again.files_read == 0 and again.images_decoded == 0 and again.series_checked == 0
        assert again.files_unchanged == first.files_seen
        assert (again.series_ok, again.series_rejected) == (first.series_ok, first.series_rejected)


def test_changed_and_removed_files_recheck_only_their_series(tmp_path: Path) -> None:
    src = _site(tmp_path)
    with Catalog.open(tmp_path / "ws") as catalog:
        ingest_folder(catalog, src)
        # Repair the truncated series by rewriting it, and remove one slice of the good CT.
        shutil.rmtree(src / "truncated-ct")
        write_series(src / "truncated-ct", n=20, patient_id="P3", seed=4)
        victim = sorted((src / "good-ct").iterdir())[0]
        victim.unlink()
        report = ingest_folder(catalog, src)
        assert report.series_checked == 2 and report.files_removed == 1
        by_status = _series_by_status(catalog)
    reasons = {s["reason"] for s in by_status["rejected"]}
    assert reasons <= {"missing-slice", "too-few-slices"} and len(by_status["rejected"]) == 1
    assert report.series_ok == 4


def test_touching_a_file_rechecks_its_series(tmp_path: Path) -> None:
    src = _site(tmp_path)
    with Catalog.open(tmp_path / "ws") as catalog:
        ingest_folder(catalog, src)
        target = next((src / "good-mr").iterdir())
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        report = ingest_folder(catalog, src)
    assert report.files_read == 1 and report.series_checked == 1 and report.images_decoded == 1


def test_copied_file_is_a_duplicate_and_the_series_stays_usable(tmp_path: Path) -> None:
    src = _site(tmp_path)
    extra = src / "copies"
    extra.mkdir()
    shutil.copy(next((src / "good-mr").iterdir()), extra / "copy.dcm")
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
    assert report.rejected["file:duplicate-instance"] == 1
    assert report.series_ok == 4


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "ws") as catalog, pytest.raises(FileNotFoundError, match="not a folder"):
        ingest_folder(catalog, tmp_path / "nope")


def test_dicomdir_missing_reference_is_reported(pydicom_files: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    shutil.copytree(pydicom_files / "dicomdirtests", media)
    (media / "77654033" / "CR1" / "6154").unlink()
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, media)
        missing = [r for r in series_listing(catalog)["rejected_files"] if r["reason"] == "missing-file"]
    assert report.rejected["file:missing-file"] >= 1
    assert any(m["path"].endswith(os.path.join("CR1", "6154")) for m in missing)


def test_links_and_unreadable_folders_are_recorded_not_skipped_silently(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    src = tmp_path / "dicom"
    write_series(src / "good", n=20, patient_id="P1", seed=1)
    outside = tmp_path / "elsewhere"
    write_series(outside, n=20, patient_id="P2", seed=2)
    (src / "linked-folder").symlink_to(outside, target_is_directory=True)
    (src / "linked-file").symlink_to(next(outside.iterdir()))
    locked = src / "locked"
    write_series(locked, n=20, patient_id="P3", seed=3)
    scandir = os.scandir

    def refuse_locked(path: object) -> object:  # as a folder without read permission (tests run as root)
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        again = ingest_folder(catalog, src)
        rows = {Path(r["path"]).name: (r["reason"], r["message"]) for r in series_listing(catalog)["rejected_files"]}
    assert report.series_ok == 1 and again.series_checked == 0
    assert rows["linked-folder"][0] == rows["linked-file"][0] == "symlink-not-followed"
    assert rows["locked"][0] == "unreadable" and "Permission denied" in rows["locked"][1]
    assert report.rejected["file:symlink-not-followed"] == 2 and report.rejected["file:unreadable"] == 1


def test_a_truncated_copy_is_reported_as_truncated_and_the_complete_file_is_used(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    paths, _, _ = write_series(src / "ct", n=20, patient_id="P1", seed=1)
    data = paths[3].read_bytes()
    (src / "a-copy-cut-short.dcm").write_bytes(data[: len(data) - 40])  # sorts first, and is shorter
    (src / "b-exact-copy.dcm").write_bytes(data)
    with Catalog.open(tmp_path / "ws") as catalog:
        report = ingest_folder(catalog, src)
        rows = {Path(r["path"]).name: r["reason"] for r in series_listing(catalog)["rejected_files"]}
    assert report.series_ok == 1 and report.series_rejected == 0
    # The complete copies are the same size: the first of them by path (src/b-exact-copy.dcm) is used.
    assert rows == {"a-copy-cut-short.dcm": "truncated-pixel-data", paths[3].name: "duplicate-instance"}
