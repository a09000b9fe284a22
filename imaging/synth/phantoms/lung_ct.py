"""The ``lung-ct`` phantom: a chest CT with lungs, vessels, heart and spine; positives carry a lung nodule."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from imaging.synth.geometry import Grid, ellipsoid, paint, soft
from imaging.synth.modalities import CtPhantom
from imaging.synth.study import Lesion

__all__ = ["PHANTOM", "draw_chest"]


def draw_chest(rng: np.random.Generator, grid: Grid, label: int, body: float) -> tuple[np.ndarray, Lesion | None]:
    """A chest in Hounsfield units; with ``label`` 1, a solid or part-solid nodule in aerated lung.

    Args:
        rng: The study's random source.
        grid: The axial CT grid.
        label: 1 to draw a nodule.
        body: The patient's size factor.

    Returns:
        HU on ``grid`` and the nodule (None if ``label`` is 0).
    """
    x, y, z = grid.points()
    edge = max(grid.spacing[1], grid.spacing[0]) * 0.8
    a, b = 160.0 * body * rng.uniform(0.92, 1.08), 115.0 * body * rng.uniform(0.9, 1.1)
    cy = rng.uniform(-6, 6)
    hu = np.full(grid.shape, -1000.0, np.float32)
    paint(hu, ellipsoid(x, y, None, (0, cy), (a, b), edge), -100.0)  # subcutaneous fat
    paint(hu, ellipsoid(x, y, None, (0, cy), (a - 14, b - 12), edge), 45.0)  # chest wall muscle
    zc = float(grid.position(grid.shape[0] // 2)[2]) + rng.uniform(-20, 10)
    lungs = []
    for side in (-1, 1):  # patient right (-x), left (+x)
        centre = (side * 0.47 * a, cy - 0.05 * b, zc + rng.uniform(-5, 5))
        radii = (0.36 * a * rng.uniform(0.93, 1.05), 0.72 * b, rng.uniform(130, 160))
        w = ellipsoid(x, y, z, centre, radii, edge)
        lungs.append((centre, radii, w))
        paint(hu, w, -860.0 + rng.uniform(-20, 20))
    lung_mask = np.maximum(lungs[0][2], lungs[1][2])
    # Vessels: tubes winding along z inside the lungs.
    for _ in range(int(rng.integers(8, 14))):
        centre, radii, _w = lungs[int(rng.integers(0, 2))]
        x0 = centre[0] + rng.uniform(-0.6, 0.6) * radii[0]
        y0 = centre[1] + rng.uniform(-0.6, 0.6) * radii[1]
        amp, wave, phase = rng.uniform(5, 20), rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
        cx = x0 + amp * np.sin(z / wave + phase)
        cyv = y0 + amp * np.cos(z / wave + phase)
        d = np.sqrt((x - cx) ** 2 + (y - cyv) ** 2)
        paint(hu, soft(d - rng.uniform(0.8, 1.8), edge) * lung_mask, 40.0)
    heart_r = (rng.uniform(50, 62) * body, rng.uniform(45, 55) * body)
    paint(hu, ellipsoid(x, y, None, (18, cy - 0.2 * b), heart_r, edge) * (z < zc + 40), 40.0)
    paint(hu, ellipsoid(x, y, None, (14, cy + 0.35 * b), (12, 12), edge), 45.0)  # aorta
    paint(hu, ellipsoid(x, y, None, (0, cy + 0.62 * b), (19, 17), edge), 750.0)  # vertebral cortex
    paint(hu, ellipsoid(x, y, None, (0, cy + 0.62 * b), (15, 13), edge), 260.0)  # cancellous bone
    paint(hu, ellipsoid(x, y, None, (0, cy + 0.62 * b + 24), (7, 7), edge), 20.0)  # spinal canal
    lesion = None
    if label:
        r = float(rng.uniform(12.0, 22.0))
        # A voxel of aerated lung at least a radius away from anything else, inside the scanned range.
        lung_air = (hu < -600) & (lung_mask > 0.5)
        core = ndimage.binary_erosion(lung_air, iterations=max(1, int(round(r / max(grid.spacing)))))
        core[:3] = core[-3:] = False
        candidates = np.argwhere(core if core.any() else lung_air)
        pick = tuple(candidates[int(rng.integers(0, len(candidates)))])
        p = np.array([float(x[pick]), float(y[pick]), float(z[pick])])
        kind = "solid nodule" if rng.random() < 0.75 else "part-solid nodule"
        w = ellipsoid(x, y, z, p, (r, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)), edge)
        if kind == "solid nodule":
            paint(hu, w, float(rng.uniform(10, 60)))
        else:
            paint(hu, w, -450.0)
            paint(hu, ellipsoid(x, y, z, p, (0.55 * r,) * 3, edge), 30.0)
        lesion = Lesion(p, r, kind, w)
    return hu, lesion


PHANTOM = CtPhantom(
    task="lung-ct",
    study_description="CT CHEST",
    series_description="Thorax {thickness:.1f} Br40",
    body_part="CHEST",
    window=(-600, 1500),
    centre_z_mm=(-150, -80),
    draw=draw_chest,
)
