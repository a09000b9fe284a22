"""Geometry for drawing anatomy: a voxel grid in patient coordinates and soft-edged shapes painted on it.

Anatomy is drawn analytically in patient coordinates (LPS, mm) and sampled at each voxel centre, so any
slice thickness, pixel spacing or oblique plane gives a consistent image and an exact lesion mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Grid", "ellipsoid", "paint", "smooth_noise", "soft"]


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a volume (or a single plane) in LPS patient coordinates.

    Voxel ``(k, r, c)`` (slice, row, column) lies at
    ``origin + c * spacing[2] * row_dir + r * spacing[1] * col_dir + k * spacing[0] * normal``;
    ``row_dir`` and ``col_dir`` are the two triplets of ImageOrientationPatient. Slices are in
    ascending order along the normal, which is the order a reader produces.

    Args:
        origin: Patient position of voxel ``(0, 0, 0)`` in mm.
        row_dir: Direction of increasing column index (first triplet of ImageOrientationPatient).
        col_dir: Direction of increasing row index (second triplet of ImageOrientationPatient).
        spacing: ``(slice, row, column)`` spacing in mm.
        shape: ``(slices, rows, columns)``.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    shape: tuple[int, int, int]  # (slices, rows, columns)

    @property
    def normal(self) -> np.ndarray:
        """The slice normal: ``row_dir × col_dir``."""
        return np.cross(self.row_dir, self.col_dir)

    @staticmethod
    def centred(centre: Sequence[float] | np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                tilt_deg: float = 0.0) -> Grid:
        """An axial grid (tilted about the left-right axis by ``tilt_deg``) centred on ``centre``.

        Args:
            centre: Patient point (mm) at the centre of the grid.
            shape: ``(slices, rows, columns)``.
            spacing: ``(slice, row, column)`` spacing in mm.
            tilt_deg: Tilt of the plane about the patient's left-right axis.

        Returns:
            The grid.
        """
        t = math.radians(tilt_deg)
        row_dir = np.array([1.0, 0.0, 0.0])
        col_dir = np.array([0.0, math.cos(t), -math.sin(t)])
        normal = np.cross(row_dir, col_dir)
        n, rows, cols = shape
        half = ((cols - 1) * spacing[2] * row_dir + (rows - 1) * spacing[1] * col_dir
                + (n - 1) * spacing[0] * normal) / 2
        return Grid(np.asarray(centre, float) - half, row_dir, col_dir, spacing, shape)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + k * self.spacing[0] * self.normal

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """X, Y, Z of every voxel centre, each of shape ``(slices, rows, columns)`` (float32)."""
        n, rows, cols = self.shape
        k = np.arange(n, dtype=np.float32)[:, None, None] * self.spacing[0]
        r = np.arange(rows, dtype=np.float32)[None, :, None] * self.spacing[1]
        c = np.arange(cols, dtype=np.float32)[None, None, :] * self.spacing[2]
        out = []
        for axis in range(3):
            out.append((self.origin[axis] + c * self.row_dir[axis] + r * self.col_dir[axis]
                        + k * self.normal[axis]).astype(np.float32))
        return out[0], out[1], out[2]

    def voxel(self, point: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
        """``(slice, row, column)`` of a patient point (fractional)."""
        d = np.asarray(point, float) - self.origin
        return (float(d @ self.normal / self.spacing[0]), float(d @ self.col_dir / self.spacing[1]),
                float(d @ self.row_dir / self.spacing[2]))


def soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume weight from a signed distance.

    Args:
        signed: Signed distance to a boundary in mm (negative inside).
        edge: Width of the blurred boundary in mm.

    Returns:
        Weights in [0, 1] (float32): 1 well inside, 0 well outside.
    """
    return np.clip(0.5 - signed / edge, 0.0, 1.0).astype(np.float32)


def ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray | None, centre: Sequence[float] | np.ndarray,
              radii: Sequence[float] | np.ndarray, edge: float) -> np.ndarray:
    """Soft ellipsoid (or an infinite elliptic cylinder along z when ``z`` is None).

    Args:
        x: Patient X of each voxel (mm).
        y: Patient Y of each voxel (mm).
        z: Patient Z of each voxel (mm), or None for a cylinder along z.
        centre: Centre in mm (two values suffice for a cylinder).
        radii: Semi-axes in mm (two values suffice for a cylinder).
        edge: Width of the blurred boundary in mm.

    Returns:
        Partial-volume weights in [0, 1], shaped like ``x``.
    """
    q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    if z is not None:
        q = q + ((z - centre[2]) / radii[2]) ** 2
    r_min = min(radii[:3] if z is not None else radii[:2])
    return soft((np.sqrt(q) - 1.0) * r_min, edge)


def paint(volume: np.ndarray, weight: np.ndarray, value: float | np.ndarray) -> None:
    """Blend ``value`` into ``volume`` with partial-volume ``weight`` (in place).

    Args:
        volume: The image being drawn (modified).
        weight: Weights in [0, 1], broadcastable to ``volume``.
        value: The intensity of the painted tissue (a scalar or an array like ``volume``).
    """
    volume *= 1.0 - weight
    volume += weight * value


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | Sequence[float]) -> np.ndarray:
    """Correlated Gaussian noise with unit standard deviation.

    Args:
        rng: The random source.
        shape: Output shape.
        sigma: Gaussian smoothing in voxels (one value, or one per axis).

    Returns:
        Float32 noise of ``shape``.
    """
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field_ / max(float(field_.std()), 1e-6)
