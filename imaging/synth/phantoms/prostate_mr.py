"""The ``prostate-mr`` phantom: a T2-weighted male pelvis with zonal prostate anatomy; positives carry a
T2-hypointense peripheral- or transition-zone lesion."""

from __future__ import annotations

import numpy as np

from imaging.synth.geometry import Grid, ellipsoid, paint, smooth_noise
from imaging.synth.modalities import MrPhantom
from imaging.synth.study import Lesion

__all__ = ["PHANTOM", "draw_pelvis"]


def draw_pelvis(rng: np.random.Generator, grid: Grid, label: int, body: float,
                centre: np.ndarray) -> tuple[np.ndarray, Lesion | None]:
    """T2-weighted signal in arbitrary units (fat about 1000), with the coil's sensitivity.

    Args:
        rng: The study's random source.
        grid: The MR grid (axial or oblique).
        label: 1 to draw a lesion.
        body: The patient's size factor.
        centre: The prostate's centre in patient mm.

    Returns:
        Signal on ``grid`` and the lesion (None if ``label`` is 0).
    """
    x, y, z = grid.points()
    edge = max(grid.spacing[1], grid.spacing[0]) * 0.8
    px, py, pz = centre
    a, b = 175.0 * body, 125.0 * body
    s = np.zeros(grid.shape, np.float32)
    paint(s, ellipsoid(x, y, None, (0, py - 10), (a, b), edge), 1000.0)  # fat
    paint(s, ellipsoid(x, y, None, (0, py - 10), (a - 10, b - 10), edge), 950.0)
    for side in (-1, 1):
        paint(s, ellipsoid(x, y, None, (px + side * 95, py + 5), (30, 30), edge), 150.0)  # femoral head cortex
        paint(s, ellipsoid(x, y, None, (px + side * 95, py + 5), (24, 24), edge), 700.0)  # marrow
        paint(s, ellipsoid(x, y, None, (px + side * 48, py), (14, 35), edge), 330.0)  # obturator internus
    gland = (1.0 + 0.15 * rng.standard_normal()) * np.array([22.0, 16.0, 18.0])
    paint(s, ellipsoid(x, y, z, (px, py - 8, pz + gland[2] + 22), (48, 38, 30), edge), 1500.0)  # bladder
    paint(s, ellipsoid(x, y, None, (px, py + gland[1] + 14), (17, 14), edge), 220.0)  # rectal wall
    paint(s, ellipsoid(x, y, None, (px, py + gland[1] + 14), (9, 7), edge), 40.0)  # rectal lumen
    paint(s, ellipsoid(x, y, z, (px, py, pz), gland + 1.5, edge), 260.0)  # capsule
    paint(s, ellipsoid(x, y, z, (px, py, pz), gland, edge), 780.0)  # peripheral zone
    tz = ellipsoid(x, y, z, (px, py - 0.35 * gland[1], pz + 2), gland * np.array([0.7, 0.6, 0.75]), edge)
    texture = 430.0 + 60.0 * smooth_noise(rng, grid.shape, (0.6, 1.2, 1.2))
    paint(s, tz, texture)  # transition zone, nodular
    lesion = None
    if label:
        r = float(rng.uniform(5.0, 9.0))
        if rng.random() < 0.8:
            kind = "peripheral-zone lesion"
            side = rng.choice([-1.0, 1.0])
            p = np.array([px + side * rng.uniform(5, 12), py + 0.55 * gland[1], pz + rng.uniform(-6, 6)])
        else:
            kind = "transition-zone lesion"
            p = np.array([px + rng.uniform(-6, 6), py - 0.35 * gland[1], pz + rng.uniform(-5, 5)])
        w = ellipsoid(x, y, z, p, (r * 1.2, r * 0.8, r), edge)
        paint(s, w, float(rng.uniform(180, 260)))
        lesion = Lesion(p, r, kind, w)
    # Coil sensitivity: strongest posteriorly (endorectal/posterior coil), smooth.
    bias = 1.0 + 0.25 * (y - py) / b + 0.08 * smooth_noise(rng, grid.shape, 6.0)
    return s * bias.astype(np.float32), lesion


PHANTOM = MrPhantom(
    task="prostate-mr",
    study_description="MRI PROSTATE",
    body_part="PROSTATE",
    region=("41216001", "SCT", "Prostate"),
    organ_mm=((-5, 5), (20, 35), (-420, -380)),
    draw=draw_pelvis,
    patient_sex="M",
)
