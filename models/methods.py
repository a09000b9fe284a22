"""The saliency methods, without importing torch (command-line help lists them; :mod:`models.saliency` computes
them). Adding a method: a member here and its computation in :mod:`models.saliency`."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EXPLAIN_METHODS", "REVIEW_METHODS", "Method"]


class Method(StrEnum):
    """Saliency methods."""

    GRADCAM = "gradcam"
    GRADCAMPP = "gradcampp"
    HIRESCAM = "hirescam"
    OCCLUSION = "occlusion"


EXPLAIN_METHODS: tuple[Method, ...] = (Method.HIRESCAM,)
"""What ``explain`` maps by default: HiResCAM, whose peak lay on the lesion in 84-100 % of lesion images on the
synthetic lung, prostate and colorectal tasks, where Grad-CAM's did on 0 % of prostate MRs (BENCHMARKS.md,
"Saliency")."""
REVIEW_METHODS: tuple[Method, ...] = (Method.HIRESCAM, Method.GRADCAM, Method.GRADCAMPP)
"""What the review page offers by default, the first shown first (occlusion, slow, on request)."""
