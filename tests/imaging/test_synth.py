"""The synthetic consortium: real DICOM that ingests cleanly, with lesion records that match the pixels."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from imaging.catalog import Catalog
from imaging.dicom import read_image
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.presets import PRESETS
from imaging.synth import ALL_TASKS, generate_consortium, ingested_consortium
from imaging.synth_cli import main as synth_main

STUDIES = 6  # per task at an average site: sites get 6, 4 and 8 (size factors 1, 0.75, 1.25)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("consortium")
    generate_consortium(out, sites=3, studies_per_task=STUDIES, seed=3)
    return out


@pytest.fixture(scope="module")
def workspaces(consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("workspaces")
    out = {}
    for site in sorted(p for p in consortium.iterdir() if p.is_dir()):
        with Catalog.open(root / site.name) as catalog:
            ingest_folder(catalog, site / "dicom")
            load_labels(catalog, site / "labels.csv")
        out[site.name] = root / site.name
    return out


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_labels_and_sites_differ(consortium: Path) -> None:
    manifest = json.loads((consortium / "consortium.json").read_text())
    assert manifest["format"] == "oncofed.synthetic-consortium/1"
    sites = sorted(p.name for p in consortium.iterdir() if p.is_dir())
    assert sites == ["site-a", "site-b", "site-c"]
    prevalence, counts = [], []
    for name in sites:
        rows = (consortium / name / "labels.csv").read_text().splitlines()
        assert rows[0] == "study_instance_uid,task,label"
        labels = [r.split(",") for r in rows[1:]]
        assert {t for _, t, _ in labels} == set(ALL_TASKS)
        for task in ALL_TASKS:
            task_labels = [int(lbl) for _, t, lbl in labels if t == task]
            assert task_labels.count(0) >= 2 and task_labels.count(1) >= 2, (name, task)
        prevalence.append(np.mean([int(lbl) for *_, lbl in labels]))
        counts.append(len(labels))
    assert len(set(counts)) == 3  # sites differ in size...
    assert max(prevalence) - min(prevalence) > 0.1  # ...and in class balance (at least 2 per class)
    vendors, thickness = set(), set()
    for name in sites:
        for p in (consortium / name / "dicom").rglob("*"):
            if p.is_file():
                ds = pydicom.dcmread(p, stop_before_pixels=True)
                if ds.Modality == "CT":
                    vendors.add(ds.Manufacturer)
                    thickness.add(float(ds.SliceThickness))
                    break
    assert len(vendors) == 3 and len(thickness) == 3


def test_consortium_ingests_with_no_rejects_and_labels_join(workspaces: dict[str, Path]) -> None:
    for name, ws in workspaces.items():
        with Catalog.open(ws, create=False) as catalog:
            bad_series = catalog.db.execute("SELECT count(*) FROM series WHERE status != 'ok'").fetchone()[0]
            bad_files = catalog.db.execute("SELECT count(*) FROM files WHERE status != 'ok'").fetchone()[0]
            assert (bad_series, bad_files) == (0, 0), name
            unlabeled = catalog.db.execute(
                "SELECT count(*) FROM studies s LEFT JOIN labels l ON l.study_uid = s.study_uid "
                "WHERE l.study_uid IS NULL"
            ).fetchone()[0]
            assert unlabeled == 0, name
            for task in ALL_TASKS:
                items = catalog.items(task)
                assert items, (name, task)
                assert {i.label for i in items} == {0, 1}
                by_split: dict[str, set[str]] = {}
                for item in items:
                    assert item.split in ("train", "val", "test")
                    by_split.setdefault(item.split, set()).add(item.patient_pseudonym)
                splits = list(by_split.values())
                for a in range(len(splits)):
                    for b in range(a + 1, len(splits)):
                        assert not splits[a] & splits[b], f"{name}/{task}: a patient in two splits"


def test_reingest_of_generated_site_decodes_nothing(consortium: Path, workspaces: dict[str, Path]) -> None:
    with Catalog.open(workspaces["site-b"], create=False) as catalog:
        report = ingest_folder(catalog, consortium / "site-b" / "dicom")
    assert report.files_seen > 0
    assert report.files_unchanged == report.files_seen
    assert report.files_read == 0 and report.images_decoded == 0


def _region_means(image: np.ndarray, mask: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    """Median inside the lesion mask and in a shell around it (inside the body)."""
    from scipy import ndimage

    shell = ndimage.binary_dilation(mask, iterations=2) & ~mask & body
    return float(np.median(image[mask])), float(np.median(image[shell]))


def test_lesion_records_match_the_pixels_at_every_site(consortium: Path, workspaces: dict[str, Path]) -> None:
    """Centre and mask point at the lesion in the image the reader makes: covers the oblique MR, the
    enhanced multi-frame MR with frames stored in reverse, MONOCHROME1, JPEG 2000 and RLE mammograms."""
    checked: dict[str, int] = {}
    for name, ws in workspaces.items():
        records = json.loads((consortium / name / "lesions.json").read_text())
        by_key = {r["sop_instance_uid"] or r["series_instance_uid"]: r for r in records}
        with Catalog.open(ws, create=False) as catalog:
            for task in ALL_TASKS:
                for item in catalog.items(task):
                    record = by_key.get(item.plan.key)
                    if item.label == 0:
                        assert record is None or record["study_instance_uid"] != item.study_uid
                        continue
                    assert record is not None, (name, task, item.study_uid)
                    image = read_image(item.plan).array.astype(np.float64)
                    mask = np.load(consortium / name / record["mask"])["mask"]
                    assert mask.shape == image.shape
                    v = record["center_voxel"]
                    centre = (v["slice"], v["row"], v["col"]) if image.ndim == 3 else (v["row"], v["col"])
                    assert mask[centre], (name, task)
                    inside, around = _region_means(image, mask, image > image.min() + 1)
                    if task == "lung-ct":
                        floor = -350 if record["kind"] == "solid nodule" else -650  # part-solid: ground glass
                        assert inside > floor and around < inside - 200, (name, record["kind"], inside, around)
                    elif task == "colorectal-ct":
                        assert 60 < inside < 160, (name, inside)  # enhancing soft tissue
                    elif task == "prostate-mr":
                        assert inside < 0.8 * around, (name, inside, around)  # T2-hypointense
                    elif record["kind"] == "mass":
                        assert inside > around, (name, inside, around)  # denser than its surroundings
                    else:  # a few bright specks in the marked region
                        assert image[mask].max() > np.percentile(image[image > image.min() + 1], 99), name
                    checked[name] = checked.get(name, 0) + 1
    assert set(checked) == set(workspaces)


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        generate_consortium(out, sites=2, studies_per_task=4, seed=seed, tasks=["prostate-mr", "breast-mg"],
                            workers=1 if out != b else 2)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


def test_generator_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_consortium(tmp_path, sites=1, studies_per_task=4)
    with pytest.raises(ValueError, match="unknown task"):
        generate_consortium(tmp_path / "x", tasks=["lung"])
    with pytest.raises(ValueError, match="sites must be between"):
        generate_consortium(tmp_path / "x", sites=0)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_every_task_has_a_writer_and_reads_back_in_its_preset_geometry(consortium: Path,
                                                                        workspaces: dict[str, Path]) -> None:
    assert set(ALL_TASKS) == set(PRESETS)
    with Catalog.open(workspaces["site-a"], create=False) as catalog:
        for task, preset in PRESETS.items():
            item = catalog.items(task)[0]
            assert item.plan.spatial_dims == preset.spatial_dims
            if preset.spatial_dims == 3:
                assert len(item.plan.slices) >= preset.min_slices


def test_files_pass_the_dicom_standard_validator(consortium: Path) -> None:
    """One file of each SOP class at each site: dciodvfy reports no errors (warnings allowed)."""
    from conftest import system_tool

    system_tool("dciodvfy")
    checked = 0
    for site in sorted(p for p in consortium.iterdir() if p.is_dir()):
        seen: set[str] = set()
        for p in sorted((site / "dicom").rglob("*")):
            if not p.is_file():
                continue
            sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID)
            if sop in seen:
                continue
            seen.add(sop)
            result = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{p}: {errors}"
            checked += 1
    assert checked >= 9  # CT, MR (classic or enhanced) and MG at three sites


def test_cli_help_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        synth_main(["--help"])
    assert exc.value.code == 0
    assert "oncofed-synth --out" in capsys.readouterr().out
    assert synth_main(["--out", str(tmp_path / "x"), "--tasks", "lung"]) == 2
    assert "unknown task(s) lung" in capsys.readouterr().err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "f").write_text("x")
    assert synth_main(["--out", str(tmp_path / "y")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_writes_a_consortium(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    rc = synth_main(["--out", str(tmp_path / "c"), "--sites", "2", "--studies-per-task", "4", "--tasks",
                     "breast-mg", "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "site-b" in out and "oncofed-site ingest" in out
    assert (tmp_path / "c" / "site-b" / "labels.csv").exists()


def test_an_ingested_consortium_has_one_labelled_workspace_per_site_and_is_reused(tmp_path: Path) -> None:
    ws = ingested_consortium(tmp_path, sites=2, studies_per_task=4, seed=2, tasks=["breast-mg"])
    assert ws == tmp_path / "ws" and sorted(p.name for p in ws.iterdir()) == ["site-a", "site-b"]
    for site in ws.iterdir():
        with Catalog.open(site, create=False) as catalog:
            assert catalog.items("breast-mg")  # ingested and labelled
    stamp = {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}
    assert ingested_consortium(tmp_path, sites=2, studies_per_task=4, seed=2, tasks=["breast-mg"]) == ws
    assert {p: p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()} == stamp  # nothing redone


def _soft_tissue(site: Path) -> tuple[float, float]:
    """Over a site's CT slices, the median HU of soft tissue (-150 to 250 HU) and the median absolute difference
    between in-plane neighbours there (which grows with the noise)."""
    values, steps = [], []
    for p in sorted((site / "dicom").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p)
            if ds.Modality == "CT":
                hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                tissue = (hu > -150) & (hu < 250)
                pair = tissue[:, 1:] & tissue[:, :-1]
                values.append(hu[tissue])
                steps.append(np.abs(np.diff(hu, axis=1))[pair])
    return float(np.median(np.concatenate(values))), float(np.median(np.concatenate(steps)))


def test_the_non_iid_variant_changes_one_sites_scanners_and_nothing_else(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    iid, non_iid = tmp_path / "iid", tmp_path / "non-iid"
    tasks = ["lung-ct", "prostate-mr", "breast-mg"]
    generate_consortium(iid, sites=2, studies_per_task=4, seed=5, tasks=tasks)
    generate_consortium(non_iid, sites=2, studies_per_task=4, seed=5, tasks=tasks, unlike="site-b")
    assert _tree_digest(iid / "site-a") == _tree_digest(non_iid / "site-a")  # the others are written as without it
    assert (iid / "site-b" / "labels.csv").read_text() == (non_iid / "site-b" / "labels.csv").read_text()
    assert json.loads((non_iid / "consortium.json").read_text())["unlike"] == "site-b"
    headers = {}
    for p in sorted((non_iid / "site-b" / "dicom").rglob("*")):
        if p.is_file():
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            headers.setdefault(ds.Modality, ds)
    assert (headers["CT"].Manufacturer, float(headers["CT"].SliceThickness)) == ("TOSHIBA", 5.0)
    assert (headers["MR"].Manufacturer, float(headers["MR"].MagneticFieldStrength)) == ("Hitachi", 1.5)
    assert headers["MG"].Manufacturer == "FUJIFILM"
    (level, step), (level2, step2) = _soft_tissue(iid / "site-b"), _soft_tissue(non_iid / "site-b")
    assert step2 > 1.5 * step, (step, step2)  # twice the noise of the site's usual scanner (20 → 40 HU)
    assert level2 - level > 10, (level, level2)  # and a calibration drift (+12 → +35 HU)
    assert synth_main(["--out", str(tmp_path / "x"), "--unlike-site", "site-z"]) == 2
    assert "site-z" in capsys.readouterr().err
