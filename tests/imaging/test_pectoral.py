"""The pectoral muscle of MLO mammograms is found and removed; craniocaudal views and images without a muscle are
left alone; the breast task's preprocessing removes it before intensity scaling, and the lesion stays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose

from imaging.catalog import Catalog
from imaging.dataset import sample_dicts
from imaging.ingest import ingest_folder
from imaging.pectoral import find_pectoral, pectoral_mask, remove_pectoral
from imaging.presets import get_preset
from imaging.synth import generate_consortium
from imaging.transforms import FindPectorald, RemovePectorald, deterministic_transforms


@pytest.fixture(scope="module")
def mammograms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mg")
    generate_consortium(root, sites=2, studies_per_task=16, seed=3, tasks=["breast-mg"])
    return root


def _views(root: Path) -> list[pydicom.Dataset]:
    files = (pydicom.dcmread(p) for p in sorted(root.glob("site-*/dicom/*/*/*/*.dcm")))
    return [ds for ds in files if ds.Modality == "MG"]  # not the lesions' SEG objects


def _truth(ds: pydicom.Dataset) -> np.ndarray:
    """The muscle the phantom drew (imaging/synth/phantoms/breast_mg.py), in (columns, rows): the triangle from
    the chest-wall edge out to 35 % of the columns at the top and down to 45 % of the rows."""
    rows, cols = ds.Rows, ds.Columns
    x = np.arange(cols)[:, None].astype(float)
    y = np.arange(rows)[None, :].astype(float)
    from_wall = (cols - 1 - x) if ds.ImageLaterality == "R" else x
    return np.asarray(from_wall / (0.35 * cols) + y / (0.45 * rows) < 1.0)


def test_the_muscle_of_every_mlo_view_is_found_and_no_cc_view_loses_anything(mammograms: Path) -> None:
    views = _views(mammograms)
    sides = {ds.ImageLaterality for ds in views}
    assert sides == {"L", "R"}, "both chest-wall sides are exercised"
    masks = {}  # SOP instance UID -> the lesion the phantom drew (DICOM rows x columns)
    for site in mammograms.glob("site-*"):
        for lesion in json.loads((site / "lesions.json").read_text()):
            if lesion["sop_instance_uid"]:
                with np.load(site / lesion["mask"]) as npz:
                    masks[lesion["sop_instance_uid"]] = np.asarray(npz["mask"]) > 0
    coverage, extra, cc_found, lesions, overlapping = [], [], 0, 0, []
    for ds in views:
        image = ds.pixel_array.astype(np.float32).T
        line = find_pectoral(image)
        if ds.ViewPosition == "CC":
            cc_found += line is not None
            continue
        assert line is not None, f"no muscle found in an MLO view ({ds.ImageLaterality})"
        assert line.chest_wall_right == (ds.ImageLaterality == "R")
        truth, found = _truth(ds), pectoral_mask(image, line)
        coverage.append((found & truth).sum() / truth.sum())
        if ds.SOPInstanceUID in masks:  # a lesion beside or over the muscle stays: what is denser than muscle
            lesions += 1
            lesion = masks[ds.SOPInstanceUID].T
            core = lesion & (image > np.percentile(image[lesion], 50))
            assert not (found & core).any()
            over = lesion & truth
            if over.any():
                overlapping.append(1.0 - (found & over).sum() / over.sum())
        extra.append((found & ~truth).sum() / (~truth).sum())
    assert cc_found == 0
    assert len(coverage) >= 16 and lesions >= 4
    print(f"lesions over the muscle: {len(overlapping)}, share of their pixels there kept: {overlapping}")
    # The muscle's edge is blurred over a few pixels; what is cut beyond it is that rim.
    assert min(coverage) >= 0.97 and max(extra) <= 0.02, (min(coverage), max(extra))


def test_no_muscle_no_change() -> None:
    rng = np.random.default_rng(0)
    flat = rng.normal(100.0, 5.0, (96, 120)).astype(np.float32)
    assert find_pectoral(flat) is None
    out, line = remove_pectoral(flat)
    assert line is None and out is flat
    assert find_pectoral(np.zeros((96, 120), np.float32)) is None
    assert find_pectoral(np.ones((4, 4), np.float32)) is None


def test_the_transforms_skip_craniocaudal_views_and_search_untagged_ones(mammograms: Path) -> None:
    (mlo,) = [ds for ds in _views(mammograms) if ds.ViewPosition == "MLO"][:1]
    image = torch.as_tensor(mlo.pixel_array.astype(np.float32).T)[None]
    find, remove = FindPectorald(["image"]), RemovePectorald(["image"])
    found = find({"image": image, "view": "CC"})
    assert found["pectoral"] is None and torch.equal(found["image"], image)
    kept = remove(found)
    assert "pectoral" not in kept and torch.equal(kept["image"], image)
    for view in ("MLO", ""):
        found = find({"image": image, "view": view})
        assert torch.equal(found["image"], image)  # found now, removed after the intensity scaling
        scaled = found["image"] / 1000.0
        out = remove({**found, "image": scaled})["image"]
        truth = torch.as_tensor(_truth(mlo))[None]
        assert (out[truth] == scaled.min()).float().mean() >= 0.97
        assert torch.equal(out[~truth & (out != scaled.min())], scaled[~truth & (out != scaled.min())])


def test_breast_preprocessing_removes_the_muscle_and_keeps_the_lesion(mammograms: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, mammograms / "site-a" / "dicom")
        items = catalog.items("breast-mg", labelled_only=False)
    preset = get_preset("breast-mg")
    assert preset.remove_pectoral
    pipeline = Compose(deterministic_transforms(preset))
    samples = sample_dicts([i for i in items if i.plan.view == "MLO"])
    assert samples and all(s["view"] == "MLO" for s in samples)
    for sample in samples:
        x = pipeline(sample)["image"][0]
        # Canonical side R: the chest wall at the last column; its top corner is the muscle, now background.
        cols, rows = x.shape
        corner = x[int(0.85 * cols):, : int(0.1 * rows)]
        assert float(corner.max()) <= float(x.min()) + 1e-6
        assert float(x.max()) > 0.5  # the breast is still there
