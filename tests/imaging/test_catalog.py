"""Labels, the patient-level split and pseudonyms in the site catalog."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from dicom_factory import write_series

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import LabelFileError, load_labels, read_manifest


def _cohort(tmp_path: Path, n_patients: int = 30) -> tuple[Path, list[tuple[str, str, int]]]:
    """CT studies for ``n_patients``; every third patient has a second study. Returns labels rows."""
    src = tmp_path / "dicom"
    rows = []
    for p in range(n_patients):
        for visit in range(2 if p % 3 == 0 else 1):
            _, _, _ = write_series(src / f"p{p}" / f"v{visit}", n=16, rows=4, cols=4,
                                   patient_id=f"PID-{p:03d}", seed=p * 10 + visit)
    with Catalog.open(tmp_path / "ws") as catalog:
        ingest_folder(catalog, src)
        for i, (study,) in enumerate(catalog.db.execute("SELECT study_uid FROM studies ORDER BY study_uid")):
            rows.append((study, "lung-ct", i % 2))
    return src, rows


def _write_csv(path: Path, rows: list[tuple[str, str, int]], extra: str = "") -> Path:
    path.write_text("study_instance_uid,task,label\n" + "".join(f"{s},{t},{y}\n" for s, t, y in rows) + extra)
    return path


def test_labels_join_and_split_has_no_patient_in_two_splits(tmp_path: Path) -> None:
    _, rows = _cohort(tmp_path)
    csv = _write_csv(tmp_path / "labels.csv", rows)
    with Catalog.open(tmp_path / "ws") as catalog:
        report = load_labels(catalog, csv)
        assert report.stored == len(rows) == 40 and not report.invalid and not report.unknown_studies
        items = catalog.items("lung-ct")
        assert len(items) == 40
        splits_of_patient: dict[str, set[str | None]] = {}
        for item in items:
            splits_of_patient.setdefault(item.patient_pseudonym, set()).add(item.split)
        assert all(len(s) == 1 and None not in s for s in splits_of_patient.values())
        counts = {s: sum(1 for v in splits_of_patient.values() if s in v) for s in ("train", "val", "test")}
        assert counts["train"] >= 18 and counts["val"] >= 3 and counts["test"] >= 3
        # Both classes reach every split (stratified).
        for split in ("train", "val", "test"):
            assert {i.label for i in items if i.split == split} == {0, 1}


def test_split_is_deterministic_and_stable(tmp_path: Path) -> None:
    _, rows = _cohort(tmp_path)
    csv = _write_csv(tmp_path / "labels.csv", rows[:30])
    with Catalog.open(tmp_path / "ws") as catalog:
        load_labels(catalog, csv)
        before = dict(catalog.db.execute("SELECT patient_pseudonym, split FROM splits").fetchall())
        # More labels arrive: existing patients keep their split.
        load_labels(catalog, _write_csv(csv, rows))
        after = dict(catalog.db.execute("SELECT patient_pseudonym, split FROM splits").fetchall())
        ids = dict(catalog.db.execute("SELECT patient_id, patient_pseudonym FROM studies").fetchall())
    assert all(after[p] == s for p, s in before.items()) and len(after) > len(before)
    # A fresh workspace (a new salt, so new pseudonyms) given the same labels in the same order
    # gives every patient the same split.
    ws2 = tmp_path / "ws2"
    with Catalog.open(ws2) as catalog2:
        ingest_folder(catalog2, tmp_path / "dicom")
        load_labels(catalog2, _write_csv(tmp_path / "first.csv", rows[:30]))
        (tmp_path / "first.csv").unlink()
        load_labels(catalog2, csv)
        split2 = dict(catalog2.db.execute("SELECT patient_pseudonym, split FROM splits").fetchall())
        ids2 = dict(catalog2.db.execute("SELECT patient_id, patient_pseudonym FROM studies").fetchall())
    assert {pid: after[ids[pid]] for pid in ids} == {pid: split2[ids2[pid]] for pid in ids2}


def test_pseudonym_is_salted_and_one_way(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "a") as a, Catalog.open(tmp_path / "b") as b:
        pa, pb = a.pseudonym("PID-001"), b.pseudonym("PID-001")
        assert pa == a.pseudonym("PID-001") and pa != pb  # stable per site, different across sites
        # A keyed hash, not the ID: 16 hex digits (which may hold "001" by chance, 1 in 300), and not the plain hash.
        assert pa.startswith("p-") and len(pa) == 18 and int(pa[2:], 16) >= 0 and "PID" not in pa
        assert pa[2:] != hashlib.sha256(b"PID-001").hexdigest()[:16]


def test_bad_label_rows_are_reported_and_the_rest_load(tmp_path: Path) -> None:
    _, rows = _cohort(tmp_path, n_patients=6)
    extra = (
        f"{rows[0][0]},lung-ct,{1 - rows[0][2]}\n"  # conflicts with the first row
        f"{rows[1][0]},liver-ct,1\n"  # unknown task
        f"{rows[2][0]},lung-ct,maybe\n"  # not 0/1
        "1.2.3.4.5,lung-ct,1\n"  # a study the catalog does not hold
    )
    csv = _write_csv(tmp_path / "labels.csv", rows, extra)
    with Catalog.open(tmp_path / "ws") as catalog:
        report = load_labels(catalog, csv)
        unlabelled_before = len(rows)
        assert catalog.items("lung-ct") and len(catalog.items("lung-ct")) == unlabelled_before
    lines = dict(report.invalid)
    n = len(rows)
    assert set(lines) == {n + 2, n + 3, n + 4}
    assert "conflicts with line 2" in lines[n + 2] and "unknown task 'liver-ct'" in lines[n + 3]
    assert report.unknown_studies == ["1.2.3.4.5"]


def test_reloading_a_manifest_replaces_its_labels(tmp_path: Path) -> None:
    _, rows = _cohort(tmp_path, n_patients=6)
    csv = _write_csv(tmp_path / "labels.csv", rows)
    with Catalog.open(tmp_path / "ws") as catalog:
        load_labels(catalog, csv)
        load_labels(catalog, _write_csv(csv, rows[:3]))
        assert len(catalog.items("lung-ct")) == 3


def test_manifest_without_required_columns(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("study,label\n1.2.3,1\n")
    with Catalog.open(tmp_path / "ws") as catalog, pytest.raises(LabelFileError, match="missing column"):
        load_labels(catalog, bad)


@pytest.mark.parametrize(("content", "needle"), [
    (b"study_instance_uid,task,label\n1.2.3,lung-ct,1\nCaf\xe9,lung-ct,0\n", "is not UTF-8 text (byte 0xe9"),
    (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5\x8c", "is not UTF-8 text"),  # an .xlsx given
    (b"study_instance_uid,task,label\n" + b"x" * 200_000 + b",lung-ct,1\n", "is not a readable CSV (field larger"),
    (b"study_instance_uid,task,label,Label\n1.2.3,lung-ct,1,0\n", "label appear more than once"),
])
def test_a_label_file_that_cannot_be_read_is_one_clear_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    with Catalog.open(tmp_path / "ws") as catalog, pytest.raises(LabelFileError) as info:
        load_labels(catalog, path)
    assert needle in str(info.value) and str(path) in str(info.value)


def test_an_unreadable_label_file_names_its_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("study_instance_uid,task,label\n")

    def denied(*_: object, **__: object) -> None:  # as for a file without read permission (tests run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(LabelFileError, match="Permission denied.*check its permissions"):
        read_manifest(path)
