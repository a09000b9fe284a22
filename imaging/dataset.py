"""Datasets of a task's cataloged images, with an on-disk cache of preprocessed tensors.

The first epoch decodes each DICOM image once and stores the preprocessed tensor under the site
workspace's cache folder (MONAI ``PersistentDataset``); later epochs, rounds and runs load the
tensor instead of decoding DICOM again. The cache key covers the image plan, the files' sizes and
modification times, and the preset's preprocessing, so a changed file or preset is never served stale.
Deleting the cache loses nothing: it is rebuilt on the next epoch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from monai.data import PersistentDataset

from imaging.catalog import Item, plan_to_json
from imaging.layout import CACHE_DIR
from imaging.presets import TaskPreset
from imaging.transforms import pipeline

__all__ = [
    "PREPROCESSING_VERSION",
    "cache_folder",
    "cached_dataset",
    "file_fingerprint",
    "preprocessing_key",
    "sample_dicts",
]


# Bumped whenever a cached step's code changes what it writes (2: the lung field keeps juxtapleural nodules and
# lungs behind a thin chest wall; 3: the pectoral muscle step after intensity scaling; 4: CT fat calibration and
# the bright-structure threshold read through a median; 5: the fat peak the most prominent in the drift window,
# thin bone suppressed whatever the median; 6: calcifications enhanced in mammograms): a site's old cache is then
# never served.
PREPROCESSING_VERSION = 6


def preprocessing_key(preset: TaskPreset) -> str:
    """A short hash of everything in a preset that changes the cached tensors, and of the steps' version."""
    fields = asdict(preset)
    # What does not shape the cached tensors (patches are cut after the cache).
    for name in ("augment", "title", "diagnostic_spacing", "diagnostic_size", "patch_size", "diagnostic_patch"):
        fields.pop(name)
    fields["preprocessing_version"] = PREPROCESSING_VERSION
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]


def file_fingerprint(paths: Sequence[Path]) -> str:
    """A hash of the files' paths, sizes and modification times."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def sample_dicts(items: Sequence[Item], *, masks: bool = False) -> list[dict[str, Any]]:
    """The MONAI sample dicts of catalog items; with ``masks``, each with its lesion mask's path (``""``: none),
    whose size and time are part of the fingerprint, so a changed annotation is never served stale."""
    out = []
    for item in items:
        sample: dict[str, Any] = {"image": plan_to_json(item.plan), "label": item.label,
                                  "laterality": item.plan.laterality, "view": item.plan.view,
                                  "study_uid": item.study_uid}
        paths = list(item.plan.paths)
        if masks:
            sample["mask"] = str(item.mask) if item.mask else ""
            paths += [Path(item.mask)] if item.mask else []
        sample["fingerprint"] = file_fingerprint(paths)
        out.append(sample)
    return out


def cache_folder(workspace: Path | str, preset: TaskPreset) -> Path:
    """Where a preset's preprocessed tensors are cached in a site workspace."""
    return Path(workspace) / CACHE_DIR / f"{preset.name}-{preprocessing_key(preset)}"


def cached_dataset(
    items: Sequence[Item], preset: TaskPreset, *, workspace: Path | str, train: bool, seed: int | None = None
) -> PersistentDataset:
    """A dataset of items whose preprocessed tensors are cached in the site workspace.

    Args:
        items: Catalog items of one task.
        preset: The task preset.
        workspace: The site workspace (the cache goes in its ``cache/`` folder).
        train: Apply the preset's random augmentations after the cached steps.
        seed: Seed of the augmentations' random state (MONAI's transforms otherwise draw theirs from the operating
            system, so two runs of one configuration would differ).

    Returns:
        A MONAI PersistentDataset yielding dicts with ``image`` (channel-first float32 tensor),
        ``label`` and ``study_uid`` (and ``mask`` for a segmentation preset; when training, a list of one such
        dict: the patch MONAI's crop returns).
    """
    folder = cache_folder(workspace, preset)
    folder.mkdir(parents=True, exist_ok=True)
    data = sample_dicts(items, masks=preset.segmentation)
    transform = pipeline(preset, train=train)
    if seed is not None:
        transform.set_random_state(seed=seed)
    return PersistentDataset(data=data, transform=transform, cache_dir=folder)
