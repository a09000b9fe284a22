"""What the models need to know of each task: its number of spatial dimensions, and whether it segments.

``models`` imports nothing of ours, so this mirrors the presets in ``imaging.presets``; a test
checks the two agree. Adding a task means adding it in both places. Every image task ``X`` has a lesion
segmentation twin ``X-seg`` (a mask per image instead of a label per study).
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["SEGMENTATION_TASKS", "TASK_DIMS", "TASK_ROUNDS", "is_segmentation"]

_IMAGE_TASKS = {"lung-ct": 3, "breast-mg": 2, "colorectal-ct": 3, "prostate-mr": 3}

TASK_DIMS: MappingProxyType[str, int] = MappingProxyType(
    {**_IMAGE_TASKS, **{f"{task}-seg": dims for task, dims in _IMAGE_TASKS.items()}}
)

SEGMENTATION_TASKS: frozenset[str] = frozenset(f"{task}-seg" for task in _IMAGE_TASKS)

# Rounds of one local epoch a task needs: as many as the epochs its pooled model needs to learn on the synthetic
# consortium (3 sites × 48 studies per task, the cpu profile). FedAvg takes each site's share of the steps per
# round, so a slow learner needs its full count of rounds: prostate MR scored AUROC 0.54 on 144 held-out studies
# after 10 rounds and 0.86-0.91 after 30 (pooled, 30 epochs: 0.83-0.92); colorectal CT 0.57 after 10, 0.72-0.81
# after 20, 0.90 after 30 (BENCHMARKS.md, "The recipe search"). ``num-rounds=0`` (the default) runs a task's count.
TASK_ROUNDS: MappingProxyType[str, int] = MappingProxyType(
    {"lung-ct": 10, "breast-mg": 10, "colorectal-ct": 30, "prostate-mr": 30,
     **{f"{task}-seg": 10 for task in _IMAGE_TASKS}}
)


def is_segmentation(task: str) -> bool:
    """Whether ``task`` is a lesion segmentation task (its network outputs a mask, not one logit)."""
    return task in SEGMENTATION_TASKS
