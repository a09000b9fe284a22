"""What the models need to know of each task: its number of spatial dimensions, and whether it segments.

``models`` imports nothing of ours, so this mirrors the presets in ``imaging.presets``; a test
checks the two agree. Adding a task means adding it in both places. Every image task ``X`` has a lesion
segmentation twin ``X-seg`` (a mask per image instead of a label per study).
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["DP_TASK_ROUNDS", "PREPROCESSING_CHANGES", "PREPROCESSING_VERSION", "SEGMENTATION_TASKS", "TASK_DIMS",
           "TASK_ROUNDS", "TASK_SERVER_STEP", "UNVERSIONED_PREPROCESSING", "is_segmentation", "preprocessing_changed",
           "task_rounds", "task_server_step"]

_IMAGE_TASKS = {"lung-ct": 3, "breast-mg": 2, "colorectal-ct": 3, "prostate-mr": 3}

TASK_DIMS: MappingProxyType[str, int] = MappingProxyType(
    {**_IMAGE_TASKS, **{f"{task}-seg": dims for task, dims in _IMAGE_TASKS.items()}}
)

SEGMENTATION_TASKS: frozenset[str] = frozenset(f"{task}-seg" for task in _IMAGE_TASKS)

# Rounds of one local epoch a task needs: as many as the epochs its pooled model needs to learn on the synthetic
# consortium (3 sites × 48 studies per task, the cpu profile). FedAvg takes each site's share of the steps per
# round, so a slow learner needs its full count of rounds: colorectal CT scored AUROC 0.57 on 144 held-out studies
# after 10 rounds, 0.72-0.81 after 20, 0.90 after 30 (BENCHMARKS.md, "The recipe search"); with BatchNorm 0.91-0.97 x
# pooled after 30 rounds on four runs, one site alone better on a fifth; after 45 0.93-1.14 x pooled and above every
# site alone on all five (through Flower 0.94 x; "Colorectal at 45 rounds"). Prostate MR: 0.54 after
# 10; after 30 it reached 0.62-1.07 x pooled on three draws, after 45 0.92-1.08 x pooled on five draws of six,
# 0.10-0.30 above the best site alone (through Flower 0.96, and 1.02 non-IID; "Prostate at 45 rounds"). Both ran 30
# before 0.3.3. ``num-rounds=0`` (the default) runs a task's count (:func:`task_rounds`: under DP-SGD,
# :data:`DP_TASK_ROUNDS` where a task has an entry).
TASK_ROUNDS: MappingProxyType[str, int] = MappingProxyType(
    {"lung-ct": 10, "breast-mg": 10, "colorectal-ct": 45, "prostate-mr": 45,
     **{f"{task}-seg": 10 for task in _IMAGE_TASKS}}
)

# Under DP-SGD a task may need more rounds than without: each step is clipped and noised, and more steps at a
# higher noise (the accountant spreads the same ε over them) cost less than they add. Lung CT at 3 sites × 96
# studies, ε = 8: held-out AUROC 0.936 after 10 rounds, 0.952 after 20, 0.962 after 30 (0.990 without DP; issue
# goal: at most 3 % below it). Breast MG kept its AUROC within 1.7 % at 10 rounds (0.848 against 0.863); since the
# calcification step (preprocessing 6) it reaches 0.961 without DP, 0.785 under DP-SGD at 10 rounds and 0.830 at 30
# (BENCHMARKS.md, "Calcifications"), so it runs 30 too. These DP figures sampled images; since DP-SGD samples patients
# (0.3.5) breast reaches 0.81-0.83 at 30 rounds and its own rate of 1e-2, lung still 0.962 ("DP-SGD per patient").
# Prostate MR and colorectal CT keep the 30 rounds they were measured at under DP-SGD (BENCHMARKS.md, "DP-SGD at
# hospital sizes"; prostate at 45: 0.504 against 0.563).
DP_TASK_ROUNDS: MappingProxyType[str, int] = MappingProxyType(
    {"lung-ct": 30, "breast-mg": 30, "prostate-mr": 30, "colorectal-ct": 30})

# The server's step along the sites' mean update where a task learns faster with a longer one (an averaging strategy
# whose run sets no ``server-learning-rate``; every other task steps 1, the mean itself). A round of FedAvg averages
# the three sites' updates, so it moves about a third as far as an epoch over everyone's data: breast MG was still
# climbing after 10 rounds, 0.94-0.95 x pooled on two draws of three and significantly below one site alone on one
# (DeLong's paired test). At step 2, over five draws: 0.98-1.02 x pooled, none significantly below any site alone,
# the first significantly above pooled and every site (BENCHMARKS.md, "breast at server step 2"). A larger step was not
# kept for the other tasks: step 2 and 3 made lung unstable, and colorectal and prostate at their rounds did
# better at 1 ("The recipe search"). Under DP-SGD the step multiplies the sites' noise along with their signal: at
# epsilon 8 per patient breast reached 0.759 at step 2 against 0.813-0.825 at 1 ("DP-SGD per patient"), so it is 1.
TASK_SERVER_STEP: MappingProxyType[str, float] = MappingProxyType({"breast-mg": 2.0})


def task_server_step(task: str, *, dp: bool) -> float:
    """The server step of an averaging run of ``task`` that sets none: :data:`TASK_SERVER_STEP`, 1 under DP-SGD."""
    return 1.0 if dp else TASK_SERVER_STEP.get(task, 1.0)


PREPROCESSING_VERSION = 6
"""``imaging.dataset.PREPROCESSING_VERSION``, mirrored (a test checks they agree): every model file records the version
its images were prepared by (:func:`models.weights.save_checkpoint`)."""

PREPROCESSING_CHANGES: MappingProxyType[int, tuple[frozenset[str], str]] = MappingProxyType(
    {6: (frozenset({"breast-mg", "breast-mg-seg"}), "mammograms have their calcifications enhanced")}
)
"""The tasks whose network input each preprocessing version changed, and what changed. A model of such a task
trained before the version is refused when it is loaded (:func:`models.weights.load_checkpoint`): it would be given
images prepared otherwise than the ones it learned from. Versions before 6 are not listed: no model file recorded its
version then."""

UNVERSIONED_PREPROCESSING = 5
"""The version a model file without one was trained on (files written before 0.3.4): 5 or earlier."""


def preprocessing_changed(task: str, since: int) -> list[str]:
    """What the preprocessing versions after ``since`` changed in ``task``'s network input, oldest first (empty:
    nothing, so a model of ``since`` still reads its images as it learned them)."""
    return [f"{version}: {what}" for version, (tasks, what) in sorted(PREPROCESSING_CHANGES.items())
            if version > since and task in tasks]


def task_rounds(task: str, *, dp: bool) -> int:
    """The rounds a run of ``task`` takes when it sets none: :data:`DP_TASK_ROUNDS` under DP-SGD where the task has
    an entry, else :data:`TASK_ROUNDS`."""
    return DP_TASK_ROUNDS.get(task, TASK_ROUNDS[task]) if dp else TASK_ROUNDS[task]


def is_segmentation(task: str) -> bool:
    """Whether ``task`` is a lesion segmentation task (its network outputs a mask, not one logit)."""
    return task in SEGMENTATION_TASKS
