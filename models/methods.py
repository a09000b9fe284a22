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
TASK_METHOD: MappingProxyType[str, Method] = MappingProxyType({"prostate-mr": Method.HIRESCAM,
                                                              "colorectal-ct": Method.HIRESCAM})
"""Tasks whose first map is not Grad-CAM's, chosen on the synthetic consortium's saliency benchmark (BENCHMARKS.md,
"Saliency"): the map that most often peaks on the lesion, among those a network with random weights draws far less
often onto it.

- Prostate: Grad-CAM's peak sat a slab above the lesion, at the bladder, on most draws (0-82 % of lesion images on
  five draws of the 45-round model); HiResCAM's lay on the lesion in 67-96 %, and a random network's in 0-5 % (the
  lesion is dark).
- Colorectal: on seven models (five draws, BatchNorm and InstanceNorm) HiResCAM hit 91-100 % of tumours and every
  one the model called positive, never less often than Grad-CAM, which hit 58-100 % (74-100 % of the positive
  calls); a random network's HiResCAM falls on 17-38 % (an enhancing tumour is bright input).
- Lung and breast keep Grad-CAM: HiResCAM reads the first block, whose map a random network draws onto 50-73 % of
  bright nodules and of mammography lesions (the enhanced specks of calcifications), so a hit there says less; Grad-CAM
  hits 100 % of nodules and 91-98 % of mammography lesions on three draws of four.

Measured on the compact CNN at the cpu profile."""
REVIEW_METHODS: tuple[Method, ...] = (Method.GRADCAM, Method.HIRESCAM, Method.GRADCAMPP)
"""What the review page offers by default, each task's own first (occlusion, slow, on request)."""


def default_method(task: str) -> Method:
    """The map ``task`` shows first (``explain`` draws it when asked for none)."""
    return TASK_METHOD.get(task, DEFAULT_METHOD)


def methods_for(task: str, offered: Sequence[Method]) -> tuple[Method, ...]:
    """``offered`` with ``task``'s own method first where it is offered, the others in their order."""
    own = default_method(task)
    return (own, *(m for m in offered if m != own)) if own in offered else tuple(offered)
