"""The phantoms: one per task, keyed by the task's preset name.

Each module here draws one task's anatomy and lesion and says how its study is described; the scanner of
its modality (:mod:`imaging.synth.modalities`) does the rest. To give a new task synthetic data, add its
:class:`~imaging.presets.TaskPreset`, write a module here that defines ``PHANTOM`` (a :class:`CtPhantom`,
:class:`MrPhantom` or :class:`MgPhantom` whose ``task`` is the preset's name) and list it in
:data:`PHANTOMS`. Nothing else in :mod:`imaging.synth` names a task.
"""

from __future__ import annotations

from types import MappingProxyType

from imaging.presets import PRESETS
from imaging.synth.modalities import Phantom
from imaging.synth.phantoms import breast_mg, colorectal_ct, lung_ct, prostate_mr

__all__ = ["ALL_TASKS", "PHANTOMS", "phantom_for"]

PHANTOMS: MappingProxyType[str, Phantom] = MappingProxyType(
    {p.task: p for p in (lung_ct.PHANTOM, breast_mg.PHANTOM, colorectal_ct.PHANTOM, prostate_mr.PHANTOM)}
)
"""Task (preset name) -> its phantom."""

ALL_TASKS: tuple[str, ...] = tuple(name for name in PRESETS if name in PHANTOMS)
"""The tasks the generator writes, in the order of :data:`imaging.presets.PRESETS`."""


def phantom_for(task: str) -> Phantom:
    """The phantom of ``task``.

    Args:
        task: A preset name.

    Returns:
        Its phantom.

    Raises:
        KeyError: ``task`` has no phantom (or no preset); the message lists the tasks that have both.
    """
    if task not in PHANTOMS or task not in PRESETS:
        raise KeyError(f"no synthetic phantom for task {task!r}; tasks with one: {', '.join(ALL_TASKS)}")
    return PHANTOMS[task]
