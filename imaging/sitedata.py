"""A site's data for one task, by split, as datasets the training and evaluation loops read.

:func:`load_site_data` reads each workspace's catalog for the task's labelled images; :class:`SiteData`
turns a split into a dataset of ``(image, label)`` tensors (``(image, mask)`` for a segmentation task), each
workspace caching its own preprocessed images (:func:`imaging.dataset.cached_dataset`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from imaging.catalog import Catalog, Item
from imaging.dataset import cached_dataset
from imaging.presets import get_preset

__all__ = ["NoSiteData", "SiteData", "TensorDataset", "load_site_data"]


class NoSiteData(Exception):
    """A workspace holds no catalog, or no labelled training data of both classes for the task; the message
    names the workspace and the task and says what to do."""


def _plain(value: Any) -> torch.Tensor:
    return (value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)).float()


class TensorDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image, target)`` pairs of plain tensors from a cached MONAI dataset (Opacus' loader needs tuples): the
    target is the label as ``(1,)`` for a classification task, the lesion mask ``(1, *spatial)`` for segmentation.

    Args:
        inner: The MONAI dataset.
        masks: Targets are the samples' masks.
    """

    def __init__(self, inner: Any, *, masks: bool = False) -> None:
        self.inner = inner
        self.masks = masks

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.inner[index]
        if isinstance(sample, list):  # a random crop's list of one patch
            sample = sample[0]
        if self.masks:
            return _plain(sample["image"]), (_plain(sample["mask"]) > 0.5).float()
        return _plain(sample["image"]), torch.tensor([float(sample["label"])])


@dataclass(frozen=True)
class SiteData:
    """One task's items at one or more site workspaces, per split."""

    task: str
    items: dict[str, list[tuple[Path, Item]]]  # split -> (workspace, item)
    resolution: str = "cpu"  # the preset's resolution profile

    def count(self, split: str) -> int:
        """Images in a split."""
        return len(self.items.get(split, []))

    def labels(self, split: str) -> list[int]:
        """The labels of a split's images, in order."""
        return [item.label for _, item in self.items.get(split, [])]

    def _by_workspace(self, split: str) -> dict[Path, list[Item]]:
        """A split's items grouped by workspace, in the order :meth:`dataset` concatenates them."""
        by_ws: dict[Path, list[Item]] = {}
        for ws, item in self.items.get(split, []):
            by_ws.setdefault(ws, []).append(item)
        return by_ws

    def dataset(self, split: str, *, train: bool, seed: int | None = None) -> TensorDataset:
        """The split as a dataset; each workspace caches its own preprocessed tensors. ``seed`` fixes the random
        augmentations (each workspace's part from ``seed + its index``), so a run can be repeated exactly."""
        preset = get_preset(self.task, self.resolution)
        parts = []
        for k, (ws, items) in enumerate(self._by_workspace(split).items()):
            parts.append(cached_dataset(items, preset, workspace=ws, train=train,
                                        seed=None if seed is None else seed + k))
        return TensorDataset(torch.utils.data.ConcatDataset(parts) if len(parts) != 1 else parts[0],
                             masks=preset.segmentation)

    @property
    def segmentation(self) -> bool:
        """Whether the task segments lesions (targets are masks)."""
        return get_preset(self.task).segmentation

    def study_uids(self, split: str) -> list[str]:
        """The study of each of a split's images, in order."""
        return [item.study_uid for _, item in self.items.get(split, [])]

    def patients(self, split: str) -> list[int]:
        """The patient of each of a split's images, in the order of :meth:`dataset`, as a number: images of one
        patient (one pseudonym in one workspace) share it, and the numbers run from 0 to the split's patients less
        one. DP-SGD samples patients, not images (``fl_client.train.train_local``): a mammography study has several
        views, and a patient may have several studies."""
        numbers: dict[tuple[Path, str], int] = {}
        return [numbers.setdefault((ws, item.patient_pseudonym), len(numbers))
                for ws, items in self._by_workspace(split).items() for item in items]

    def count_patients(self, split: str) -> int:
        """Patients in a split: DP-SGD's unit of privacy."""
        return len(set(self.patients(split)))


def load_site_data(workspaces: Sequence[Path], task: str, *, resolution: str = "cpu") -> SiteData:
    """The labelled items of ``task`` in each workspace, by split, preprocessed at ``resolution``'s profile.

    Raises:
        NoSiteData: A workspace has no catalog, or no labelled training items for the task.
    """
    get_preset(task, resolution)
    items: dict[str, list[tuple[Path, Item]]] = {}
    for ws in workspaces:
        try:
            catalog = Catalog.open(ws, create=False)
        except FileNotFoundError as exc:
            raise NoSiteData(str(exc)) from None
        with catalog:
            for item in catalog.items(task):
                items.setdefault(item.split or "unassigned", []).append((Path(ws), item))
    data = SiteData(task, items, resolution)
    labels = data.labels("train")
    if not labels:
        raise NoSiteData(
            f"no labelled training studies for task {task} in {', '.join(map(str, workspaces))}; "
            "ingest with --labels first (oncofed-site status shows what is there)"
        )
    if data.segmentation:
        if 1 not in labels:
            raise NoSiteData(f"no annotated lesion in the training split of task {task}: ingest the studies' DICOM "
                             "SEG or RT Structure Set objects (oncofed-site ingest)")
        return data
    if len(set(labels)) < 2:
        raise NoSiteData(f"the training split of task {task} holds only label {labels[0]}; both classes are needed")
    return data
