"""What the models need to know of each task: its number of spatial dimensions.

``models`` imports nothing of ours, so this mirrors the presets in ``imaging.presets``; a test
checks the two agree. Adding a task means adding it in both places.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["TASK_DIMS"]

TASK_DIMS: MappingProxyType[str, int] = MappingProxyType(
    {
        "lung-ct": 3,
        "breast-mg": 2,
        "colorectal-ct": 3,
        "prostate-mr": 3,
    }
)
