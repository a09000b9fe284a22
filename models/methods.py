"""The saliency methods, without importing torch (command-line help lists them; :mod:`models.saliency` computes
them), and which one each task shows first. Adding a method: a member here and its computation in
:mod:`models.saliency`."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from types import MappingProxyType

__all__ = ["DEFAULT_METHOD", "REVIEW_METHODS", "TASK_METHOD", "Method", "default_method", "methods_for"]


class Method(StrEnum):
    """Saliency methods."""

    GRADCAM = "gradcam"
    GRADCAMPP = "gradcampp"
    HIRESCAM = "hirescam"
    OCCLUSION = "occlusion"


DEFAULT_METHOD = Method.GRADCAM
"""The map a task shows first unless :data:`TASK_METHOD` names another."""
TASK_METHOD: MappingProxyType[str, Method] = MappingProxyType({"prostate-mr": Method.HIRESCAM})
"""Tasks whose first map is not Grad-CAM's. Prostate: Grad-CAM's peak sat a slab above the lesion, at the bladder, on
three draws of the synthetic consortium (pointing game 0-54 %); HiResCAM's lay on the lesion in 61-88 %, and a random
network's in none (the lesion is dark). On lung, breast and colorectal HiResCAM hits as often or more (colorectal 95
against 81 % on one draw), but Grad-CAM passes the model-randomisation check better: HiResCAM reads the first block,
whose map a random network also draws onto bright lesions (BENCHMARKS.md, "Saliency"). Measured on the compact CNN
at the cpu profile."""
REVIEW_METHODS: tuple[Method, ...] = (Method.GRADCAM, Method.HIRESCAM, Method.GRADCAMPP)
"""What the review page offers by default, each task's own first (occlusion, slow, on request)."""


def default_method(task: str) -> Method:
    """The map ``task`` shows first (``explain`` draws it when asked for none)."""
    return TASK_METHOD.get(task, DEFAULT_METHOD)


def methods_for(task: str, offered: Sequence[Method]) -> tuple[Method, ...]:
    """``offered`` with ``task``'s own method first where it is offered, the others in their order."""
    own = default_method(task)
    return (own, *(m for m in offered if m != own)) if own in offered else tuple(offered)
