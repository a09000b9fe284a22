"""The saliency methods, without importing torch (command-line help lists them; :mod:`models.saliency` computes
them). Adding a method: a member here and its computation in :mod:`models.saliency`."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Method"]


class Method(StrEnum):
    """Saliency methods."""

    GRADCAM = "gradcam"
    GRADCAMPP = "gradcampp"
    OCCLUSION = "occlusion"
