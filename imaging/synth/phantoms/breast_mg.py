"""The ``breast-mg`` phantom: CC and MLO mammograms of a breast with fibroglandular texture, skin line and
pectoral muscle; positives carry a spiculated mass or a cluster of calcifications seen in both views."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from imaging.synth.geometry import paint, smooth_noise, soft
from imaging.synth.modalities import MgPhantom, Projection

__all__ = ["PHANTOM", "Breast"]


@dataclass(frozen=True)
class Breast:
    """One patient's breast: drawn once per study, imaged in each view.

    Args:
        density: Fibroglandular density, 0.2-0.8.
        shape: Half-height and depth of the breast as fractions of the image rows and columns.
        kind: ``"mass"`` or ``"calcification cluster"`` (what a positive study shows).
        depth: Lesion distance from the chest wall as a fraction of the breast depth.
        lesion_height: Per view, the lesion's row as a fraction of the image height.
    """

    density: float
    shape: tuple[float, float]
    kind: str
    depth: float
    lesion_height: Mapping[str, float]

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Breast:
        """Draw a breast.

        Args:
            rng: The study's random source.

        Returns:
            The breast.
        """
        density = float(rng.uniform(0.2, 0.8))
        shape = (float(rng.uniform(0.36, 0.46)), float(rng.uniform(0.62, 0.85)))
        kind = "mass" if rng.random() < 0.7 else "calcification cluster"
        depth = float(rng.uniform(0.25, 0.7))  # fraction of the breast depth from the chest wall
        heights = {"CC": float(rng.uniform(0.35, 0.65)), "MLO": float(rng.uniform(0.3, 0.6))}
        return cls(density=density, shape=shape, kind=kind, depth=depth, lesion_height=heights)

    def image(self, rng: np.random.Generator, view: str, *, rows: int, cols: int, spacing: float,
              label: int) -> Projection:
        """The right breast seen in ``view``, chest wall at the right edge (see :class:`MgAnatomy`).

        Args:
            rng: The study's random source.
            view: ``"CC"`` or ``"MLO"``.
            rows: Image rows.
            cols: Image columns.
            spacing: Pixel spacing in mm.
            label: 1 to show the lesion.

        Returns:
            Intensities in [0, 1] (1 = densest) and the lesion as drawn.
        """
        position = (self.lesion_height[view], self.depth) if label else None
        return _draw_view(rng, rows, cols, spacing, label=label, view=view, lesion_pos=position,
                          density=self.density, breast=self.shape, kind=self.kind)


def _draw_view(rng: np.random.Generator, rows: int, cols: int, spacing: float, *, label: int, view: str,
               lesion_pos: tuple[float, float] | None, density: float, breast: tuple[float, float],
               kind: str) -> Projection:
    r = np.arange(rows, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    ry, rx = breast[0] * rows, breast[1] * cols
    r0 = rows * (0.5 if view == "CC" else 0.55)
    q = np.sqrt(((r - r0) / ry) ** 2 + ((c - (cols - 1)) / rx) ** 2)
    inside = soft((q - 1.0) * min(rx, ry), 1.5)
    depth = np.clip(1.0 - q, 0.0, 1.0)  # 0 at the skin, 1 at the chest wall
    tissue = smooth_noise(rng, (rows, cols), 3.0) + 0.6 * smooth_noise(rng, (rows, cols), 1.0)
    fibro = np.clip((tissue - (1.0 - 2 * density)) * 0.6, 0, 1) * np.clip(depth * 3, 0, 1)
    img = inside * (0.28 + 0.35 * np.sqrt(depth) + 0.22 * fibro)
    img += 0.15 * soft((np.abs(q - 0.985) - 0.015) * min(rx, ry), 1.0) * inside  # skin line
    if view == "MLO":  # pectoral muscle in the upper chest-wall corner
        pect = soft(((cols - 1 - c) / (0.35 * cols) + r / (0.45 * rows) - 1.0) * 20, 2.0)
        paint(img, pect, 0.8)
    weight = None
    centre = None
    radius_mm = 0.0
    if label and lesion_pos is not None:
        lr, lc = lesion_pos
        centre = (lr * rows, cols - 1 - lc * rx)
        if kind == "mass":
            radius_mm = float(rng.uniform(6.0, 12.0))
            rad = radius_mm / spacing
            ang = np.arctan2(r - centre[0], c - centre[1])
            spikes = 1.0 + 0.18 * np.sin(7 * ang + rng.uniform(0, 6)) + 0.12 * np.sin(13 * ang + rng.uniform(0, 6))
            d = np.sqrt((r - centre[0]) ** 2 + (c - centre[1]) ** 2)
            weight = soft((d - rad * spikes) * spacing, spacing * 1.5)
            paint(img, weight, 0.97 + 0.03 * np.clip(tissue, -1, 1))  # denser than any normal tissue
        else:
            radius_mm = float(rng.uniform(6.0, 10.0))
            rad = radius_mm / spacing
            weight = np.zeros((rows, cols), np.float32)
            for _ in range(int(rng.integers(8, 16))):
                dr, dc = rng.uniform(-rad, rad, 2) * 0.8
                d = np.sqrt((r - centre[0] - dr) ** 2 + (c - centre[1] - dc) ** 2)
                dot = soft((d - rng.uniform(0.6, 1.3)) * spacing, spacing)
                paint(img, dot, 0.98)
            d = np.sqrt((r - centre[0]) ** 2 + (c - centre[1]) ** 2)
            weight = soft((d - rad) * spacing, spacing)
    return Projection(np.clip(img, 0, 1), weight, centre, radius_mm)


PHANTOM = MgPhantom(
    task="breast-mg",
    study_description="MAMMOGRAPHY",
    sample=Breast.sample,
    patient_sex="F",
)
