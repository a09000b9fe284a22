"""What the models need to know of each task: its number of spatial dimensions, and whether it segments.

``models`` imports nothing of ours, so this mirrors the presets in ``imaging.presets``; a test
checks the two agree. Adding a task means adding it in both places. Every image task ``X`` has a lesion
segmentation twin ``X-seg`` (a mask per image instead of a label per study).
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["SEGMENTATION_TASKS", "TASK_DIMS", "is_segmentation"]

_IMAGE_TASKS = {"lung-ct": 3, "breast-mg": 2, "colorectal-ct": 3, "prostate-mr": 3}

TASK_DIMS: MappingProxyType[str, int] = MappingProxyType(
    {**_IMAGE_TASKS, **{f"{task}-seg": dims for task, dims in _IMAGE_TASKS.items()}}
)

SEGMENTATION_TASKS: frozenset[str] = frozenset(f"{task}-seg" for task in _IMAGE_TASKS)


def is_segmentation(task: str) -> bool:
    """Whether ``task`` is a lesion segmentation task (its network outputs a mask, not one logit)."""
    return task in SEGMENTATION_TASKS
