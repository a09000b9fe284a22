"""The ``colorectal-ct`` phantom: a portal-venous abdominal CT with liver, kidneys, bowel and colon; positives
carry an enhancing colorectal mass on the colon wall."""

from __future__ import annotations

import numpy as np

from imaging.synth.geometry import Grid, ellipsoid, paint
from imaging.synth.modalities import CtPhantom
from imaging.synth.study import Lesion

__all__ = ["PHANTOM", "draw_abdomen"]


def draw_abdomen(rng: np.random.Generator, grid: Grid, label: int,
                 body: float) -> tuple[np.ndarray, Lesion | None]:
    """An abdomen and pelvis in Hounsfield units; with ``label`` 1, a mass on the wall of one colon segment.

    Args:
        rng: The study's random source.
        grid: The axial CT grid.
        label: 1 to draw a mass.
        body: The patient's size factor.

    Returns:
        HU on ``grid`` and the mass (None if ``label`` is 0).
    """
    x, y, z = grid.points()
    edge = max(grid.spacing[1], grid.spacing[0]) * 0.8
    a, b = 165.0 * body * rng.uniform(0.92, 1.1), 125.0 * body * rng.uniform(0.9, 1.12)
    cy = rng.uniform(-6, 6)
    z0, z1 = float(grid.position(0)[2]), float(grid.position(grid.shape[0] - 1)[2])
    zlo, zhi = min(z0, z1), max(z0, z1)
    hu = np.full(grid.shape, -1000.0, np.float32)
    paint(hu, ellipsoid(x, y, None, (0, cy), (a, b), edge), -105.0)
    paint(hu, ellipsoid(x, y, None, (0, cy), (a - 18, b - 16), edge), 50.0)  # abdominal wall muscle
    paint(hu, ellipsoid(x, y, None, (0, cy), (a - 26, b - 24), edge), -95.0)  # visceral fat
    # Liver (upper, patient right) and kidneys (upper, both sides).
    paint(hu, ellipsoid(x, y, z, (-0.45 * a, cy - 0.05 * b, zhi + 30), (0.45 * a, 0.6 * b, 75), edge), 58.0)
    for side in (-1, 1):
        # Kidneys in the portal-venous phase: enhancing parenchyma around renal-sinus fat.
        kidney = (side * 0.42 * a, cy + 0.35 * b, zhi - 10)
        paint(hu, ellipsoid(x, y, z, kidney, (28, 22, 50), edge), 185.0)
        paint(hu, ellipsoid(x, y, z, (kidney[0] - side * 6, kidney[1], kidney[2]), (11, 9, 28), edge), -70.0)
        paint(hu, ellipsoid(x, y, None, (side * 0.2 * a, cy + 0.45 * b), (18, 20), edge), 48.0)  # psoas
        paint(hu, ellipsoid(x, y, z, (side * 0.55 * a, cy + 0.3 * b, zlo - 10), (30, 45, 60), edge), 650.0)  # ilium
    paint(hu, ellipsoid(x, y, None, (0, cy + 0.62 * b), (20, 18), edge), 700.0)
    paint(hu, ellipsoid(x, y, None, (0, cy + 0.62 * b), (16, 14), edge), 230.0)
    paint(hu, ellipsoid(x, y, z, (0, cy - 0.4 * b, zlo), (45, 35, 35), edge), 10.0)  # bladder
    for _ in range(int(rng.integers(6, 11))):  # small-bowel loops: a thin wall around fluid or gas
        c = (rng.uniform(-0.4, 0.4) * a, cy + rng.uniform(-0.45, 0.15) * b, rng.uniform(zlo, zhi))
        r_loop, length = float(rng.uniform(10, 15)), float(rng.uniform(15, 30))
        paint(hu, ellipsoid(x, y, z, c, (r_loop, r_loop, length), edge), 45.0)
        paint(hu, ellipsoid(x, y, z, c, (r_loop - 3, r_loop - 3, length - 3), edge),
              float(rng.choice([-950.0, 10.0])))
    # Colon: ascending (right), descending (left), rectosigmoid (low, posterior midline).
    segments = [(-0.62 * a, cy - 0.05 * b, zlo + 40, zhi + 20), (0.62 * a, cy, zlo + 40, zhi + 20),
                (0.0, cy + 0.38 * b, zlo - 20, zlo + 60)]
    lumen_r = [float(rng.uniform(16, 24)) for _ in segments]
    for (sx, sy, s0, s1), r in zip(segments, lumen_r, strict=False):
        seg = ((z >= s0) & (z <= s1)).astype(np.float32)
        paint(hu, ellipsoid(x, y, None, (sx, sy), (r + 3, r + 3), edge) * seg, 40.0)
        paint(hu, ellipsoid(x, y, None, (sx, sy), (r, r), edge) * seg, float(rng.choice([-960.0, 20.0])))
    lesion = None
    if label:
        i = int(rng.integers(0, len(segments)))
        sx, sy, s0, s1 = segments[i]
        lo, hi = max(s0, zlo) + 15, min(s1, zhi) - 15
        zz = float(rng.uniform(lo, hi)) if hi > lo else (zlo + zhi) / 2
        theta = rng.uniform(0, 2 * np.pi)
        r = float(rng.uniform(18.0, 28.0))  # colorectal cancers are typically 3.5-6 cm at diagnosis
        p = np.array([sx + lumen_r[i] * np.cos(theta), sy + lumen_r[i] * np.sin(theta), zz])
        w = ellipsoid(x, y, z, p, (r, r * rng.uniform(0.8, 1.1), r * rng.uniform(1.0, 1.4)), edge)
        kind = "colonic mass" if rng.random() < 0.7 else "annular tumour"
        paint(hu, w, float(rng.uniform(90, 130)))  # avidly enhancing tumour, portal-venous phase
        lesion = Lesion(p, r, kind, w)
    return hu, lesion


PHANTOM = CtPhantom(
    task="colorectal-ct",
    study_description="CT ABDOMEN PELVIS",
    series_description="AP PV {thickness:.1f}",
    body_part="ABDOMEN",
    window=(40, 400),
    centre_z_mm=(-300, -200),
    draw=draw_abdomen,
)
