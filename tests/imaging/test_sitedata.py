"""A site's data for one task (imaging/sitedata.py): items by split from the real catalog, the reasons a workspace
has nothing to train on, datasets of ``(image, label)`` tensors of the preset's shape, and workspaces pooled."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
from consortium import make_workspaces

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.presets import get_preset
from imaging.sitedata import NoSiteData, SiteData, load_site_data

TASK = "lung-ct"


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ingested lung CT sites; ``root/data/<site>`` keeps their DICOM and labels, ``root/ws/<site>`` the
    workspaces."""
    root = tmp_path_factory.mktemp("sitedata")
    make_workspaces(root, sites=2, studies_per_task=12, seed=0, tasks=[TASK])
    return root


def _sites(consortium: Path) -> list[Path]:
    return sorted(p for p in (consortium / "ws").iterdir() if p.is_dir())


def _images_only(source: Path, copy: Path) -> Path:
    """A copy of a DICOM folder without its lesion SEG objects (they label the studies they mark)."""
    def segs(folder: str, names: list[str]) -> list[str]:
        files = [n for n in names if (Path(folder) / n).is_file()]
        return [n for n in files if pydicom.dcmread(Path(folder) / n, stop_before_pixels=True).Modality == "SEG"]

    shutil.copytree(source, copy, ignore=segs)
    return copy


def _ingest(consortium: Path, ws: Path, *, labels: list[tuple[str, str, str]] | None,
            annotations: bool = True) -> Path:
    """Ingest site a's DICOM into a new workspace, with these label rows (or none), and its SEG objects or not."""
    source = consortium / "data" / "site-a" / "dicom"
    if not annotations:
        source = _images_only(source, ws.parent / f"{ws.name}-images")
    with Catalog.open(ws) as catalog:
        ingest_folder(catalog, source)
        if labels is not None:
            manifest = ws.parent / f"{ws.name}-labels.csv"
            with manifest.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["study_instance_uid", "task", "label"])
                writer.writerows(labels)
            load_labels(catalog, manifest)
    return ws


def _labels_of(consortium: Path) -> list[tuple[str, str, str]]:
    with (consortium / "data" / "site-a" / "labels.csv").open(newline="") as fh:
        return [(r["study_instance_uid"], r["task"], r["label"]) for r in csv.DictReader(fh)]


def test_items_come_by_split_as_the_catalog_assigned_them(consortium: Path) -> None:
    ws = _sites(consortium)[0]
    data = load_site_data([ws], TASK)
    assert data.task == TASK and set(data.items) <= {"train", "val", "test"}
    with Catalog.open(ws, create=False) as catalog:
        for split in ("train", "val", "test"):
            expected = catalog.items(TASK, split=split)
            assert [item for _, item in data.items.get(split, [])] == expected
            assert data.count(split) == len(expected)
            assert data.labels(split) == [item.label for item in expected]
            assert data.study_uids(split) == [item.study_uid for item in expected]
        total = len(catalog.items(TASK))
    assert data.count("train") > 0 and data.count("val") > 0
    assert data.count("train") + data.count("val") + data.count("test") == total
    assert all(w == ws for split in data.items.values() for w, _ in split)
    assert set(data.labels("train")) == {0, 1}
    # The split is by patient: no patient in two splits.
    patients = {split: {item.patient_pseudonym for _, item in items} for split, items in data.items.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients.get("test", set())


def test_a_split_that_is_not_there_is_empty(consortium: Path) -> None:
    data = load_site_data(_sites(consortium)[:1], TASK)
    assert data.count("holdout") == 0 and data.labels("holdout") == [] and data.study_uids("holdout") == []


def test_a_workspace_without_a_catalog_says_to_ingest(tmp_path: Path) -> None:
    with pytest.raises(NoSiteData, match=f"no site catalog in {tmp_path}.*run 'oncofed-site ingest --workspace"):
        load_site_data([tmp_path], TASK)
    assert not (tmp_path / "catalog.sqlite").exists()  # reading never creates a catalog


def test_a_missing_workspace_among_several_is_named(consortium: Path, tmp_path: Path) -> None:
    with pytest.raises(NoSiteData, match=f"no site catalog in {tmp_path / 'gone'}"):
        load_site_data([_sites(consortium)[0], tmp_path / "gone"], TASK)


def test_a_workspace_without_labels_says_to_ingest_with_labels(consortium: Path, tmp_path: Path) -> None:
    ws = _ingest(consortium, tmp_path / "unlabelled", labels=None, annotations=False)
    with Catalog.open(ws, create=False) as catalog:
        assert len(catalog.items(TASK, labelled_only=False)) > 0  # the images are there, unlabelled
    with pytest.raises(NoSiteData, match=f"no labelled training studies for task {TASK} in {ws}; ingest with "
                                         "--labels first"):
        load_site_data([ws], TASK)


def test_a_task_the_site_does_not_hold_has_no_training_studies(consortium: Path) -> None:
    ws = _sites(consortium)[0]
    with pytest.raises(NoSiteData, match=f"no labelled training studies for task breast-mg in {ws}"):
        load_site_data([ws], "breast-mg")


def test_an_unknown_task_is_named() -> None:
    with pytest.raises(KeyError, match="unknown task 'liver-us'; known tasks: lung-ct"):
        load_site_data([], "liver-us")


@pytest.mark.parametrize("label", ["0", "1"])
def test_a_training_split_of_one_class_is_refused(consortium: Path, tmp_path: Path, label: str) -> None:
    rows = [(uid, task, label) for uid, task, _ in _labels_of(consortium)]
    ws = _ingest(consortium, tmp_path / f"only-{label}", labels=rows)
    with pytest.raises(NoSiteData, match=f"the training split of task {TASK} holds only label {label}; both classes "
                                         "are needed"):
        load_site_data([ws], TASK)


def test_the_dataset_yields_float_images_of_the_presets_shape_and_their_labels(consortium: Path) -> None:
    data = load_site_data(_sites(consortium)[:1], TASK)
    shape = (1, *get_preset(TASK).spatial_size)
    for train in (False, True):
        dataset = data.dataset("val", train=train)
        assert len(dataset) == data.count("val")
        labels = []
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert type(image) is torch.Tensor and type(label) is torch.Tensor  # plain tensors, for Opacus
            assert image.dtype == torch.float32 and tuple(image.shape) == shape
            assert torch.isfinite(image).all() and image.std() > 0
            assert label.dtype == torch.float32 and label.shape == (1,)
            labels.append(int(label.item()))
        assert labels == data.labels("val")


def test_two_workspaces_pool_and_each_caches_its_own_images(consortium: Path) -> None:
    a, b = _sites(consortium)
    one, other = load_site_data([a], TASK), load_site_data([b], TASK)
    pooled = load_site_data([a, b], TASK)
    for split in ("train", "val"):
        assert pooled.count(split) == one.count(split) + other.count(split)
        assert pooled.labels(split) == one.labels(split) + other.labels(split)
        assert pooled.study_uids(split) == one.study_uids(split) + other.study_uids(split)
        assert [w for w, _ in pooled.items[split]] == [a] * one.count(split) + [b] * other.count(split)
    assert not set(one.study_uids("train")) & set(other.study_uids("train"))
    dataset = pooled.dataset("train", train=False)
    assert len(dataset) == pooled.count("train")
    assert [int(dataset[i][1].item()) for i in range(len(dataset))] == pooled.labels("train")
    # The pooled dataset's images are each site's own, in order.
    first_b = one.count("train")
    assert torch.equal(dataset[0][0], one.dataset("train", train=False)[0][0])
    assert torch.equal(dataset[first_b][0], other.dataset("train", train=False)[0][0])
    for ws in (a, b):
        assert any(p.is_file() for p in (ws / "cache").rglob("*")), f"{ws.name} cached nothing"


def test_site_data_built_by_hand_reads_the_same(consortium: Path) -> None:
    ws = _sites(consortium)[0]
    data = load_site_data([ws], TASK)
    only_val = SiteData(TASK, {"val": data.items["val"]})
    assert only_val.count("train") == 0 and only_val.labels("val") == data.labels("val")
    assert len(only_val.dataset("val", train=False)) == data.count("val")


def test_a_seed_makes_the_augmentations_repeatable(consortium: Path) -> None:
    data = load_site_data(_sites(consortium), TASK)

    def first_images(seed: int | None) -> list[torch.Tensor]:
        ds = data.dataset("train", train=True, seed=seed)
        return [ds[i][0] for i in range(4)]

    a, b, c = first_images(3), first_images(3), first_images(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
