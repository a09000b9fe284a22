"""The pectoral muscle of a mediolateral-oblique (MLO) mammogram, found so that it can be removed.

In an MLO view the pectoral muscle is a bright triangle in the upper corner at the chest wall. It is as dense
as a mass and carries no finding, and a network trained on the breast task leans on it (the saliency benchmark
found Grad-CAM peaks on it in most missed breast images). Removing it is a standard step of mammography CAD.

The muscle's edge is close to a straight line from the top edge of the image to the chest-wall edge. This module
searches those lines (Kwok et al., IEEE TMI 2004 use a straight line as the first approximation too) on a coarse
copy of the image and keeps the one with the largest step in intensity across it: the mean inside the triangle
against the mean of a band of breast just outside, both without their brightest fifth (so that a mass, denser
than the muscle, in the triangle or beside it cannot pull the line over itself), in units of the breast's
intensity spread; then refines it on a finer copy. A step below :data:`MIN_CONTRAST` (a craniocaudal view, a
muscle that is not in the image) finds nothing, and the image is
left as it is. Curved muscle edges are cut along the chord: a sliver of muscle stays at the middle of the edge,
and none of the breast below it goes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MARGIN", "MIN_CONTRAST", "PectoralLine", "find_pectoral", "pectoral_mask", "remove_pectoral"]

MIN_CONTRAST = 0.9  # step across the edge, in standard deviations of the breast's intensities
_COARSE = 64  # the search runs on a copy at most this many pixels on its longer side
_FINE = 192  # and is refined on one at most this many
_CANDIDATES = 40  # intercepts tried on each edge
_BAND = 0.3  # the band outside the line: where x/x0 + y/y1 lies in [1, 1 + _BAND)
_TRIM = 0.2  # share of the brightest pixels each side leaves out
_MAX_SHARE = 0.4  # a triangle holding more of the breast than this is not a muscle
MARGIN = 2.0  # pixels removed beyond the line found (the search's step and the muscle's blurred edge)


class PectoralLine:
    """A pectoral muscle found in an image: the triangle between the chest-wall edge, the top edge and a line.

    Attributes:
        chest_wall_right: Whether the chest wall is at the image's last column (else its first).
        top: Where the line meets the top edge, in columns from the chest wall.
        side: Where the line meets the chest-wall edge, in rows from the top.
        contrast: The step in intensity across the line, in standard deviations of the breast.
        ceiling: The muscle's brightest plausible intensity (its median plus four robust standard deviations):
            anything denser inside the triangle, such as a mass projected over the muscle, is kept.
    """

    def __init__(self, chest_wall_right: bool, top: float, side: float, contrast: float,
                 ceiling: float = float("inf")) -> None:
        self.chest_wall_right, self.top, self.side, self.contrast = chest_wall_right, top, side, contrast
        self.ceiling = ceiling

    def __repr__(self) -> str:
        return (f"PectoralLine(chest_wall_right={self.chest_wall_right}, top={self.top:.1f}, side={self.side:.1f}, "
                f"contrast={self.contrast:.2f}, ceiling={self.ceiling:.1f})")


def _foreground(image: np.ndarray) -> tuple[np.ndarray, float]:
    lo, hi = float(image.min()), float(np.percentile(image, 99.5))
    return image > lo + 0.05 * (hi - lo), lo


def _coarse(image: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Block means, so that the longer side is at most ``size`` pixels; and the block size."""
    f = max(1, int(np.ceil(max(image.shape) / size)))
    cols, rows = (image.shape[0] // f) * f, (image.shape[1] // f) * f
    return image[:cols, :rows].reshape(cols // f, f, rows // f, f).mean(axis=(1, 3)), f


def find_pectoral(image: np.ndarray) -> PectoralLine | None:
    """The pectoral muscle's line in a mammogram, or None when there is none to find.

    Args:
        image: ``(columns, rows)`` intensities (MONAI's 2D layout: x along the first axis, row 0 at the top),
            brighter meaning denser, as read from the DICOM (MONOCHROME2 after the reader).

    Returns:
        The line, or None when no straight edge from the top edge to the chest wall separates a region brighter
        than the breast next to it by :data:`MIN_CONTRAST` standard deviations.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 8:
        return None
    fg, _ = _foreground(img)
    # The chest wall is the side the breast touches along more of its length.
    right = bool(fg[-2:].mean() >= fg[:2].mean())
    walled = img[::-1] if right else img  # chest wall at column 0 from here on
    small, f = _coarse(walled, _COARSE)
    cols, rows = small.shape
    found = _search(small, np.linspace(0.08 * cols, 0.85 * cols, _CANDIDATES),
                    np.linspace(0.08 * rows, 0.95 * rows, _CANDIDATES))
    if found is None or found[0] < MIN_CONTRAST:
        return None
    # Then on a finer copy, around the line found: the coarse grid's step would leave a rim of muscle.
    fine, g = _coarse(walled, _FINE)
    to_fine = lambda v: (v + 0.5) * f / g - 0.5  # noqa: E731
    dx, dy = 1.5 * 0.77 * cols / (_CANDIDATES - 1) * f / g, 1.5 * 0.87 * rows / (_CANDIDATES - 1) * f / g
    x0, y1 = to_fine(found[1]), to_fine(found[2])
    refined = _search(fine, np.linspace(max(x0 - dx, 1.0), x0 + dx, 13), np.linspace(max(y1 - dy, 1.0), y1 + dy, 13))
    contrast, x0, y1 = refined if refined is not None and refined[0] >= MIN_CONTRAST else (found[0], x0, y1)
    line = PectoralLine(right, (x0 + 0.5) * g - 0.5, (y1 + 0.5) * g - 0.5, contrast)
    muscle = img[_triangle(img.shape, line, 0.0)]
    median = float(np.median(muscle))
    line.ceiling = median + 4.0 * 1.4826 * float(np.median(np.abs(muscle - median)))
    return line


def _trimmed_mean(values: np.ndarray) -> float:
    """The mean without the brightest :data:`_TRIM` of the values: a mass, denser than the muscle, in the triangle
    or beside it must not decide where the line goes."""
    keep = max(1, int(len(values) * (1.0 - _TRIM)))
    return float(np.partition(values, keep - 1)[:keep].mean())


def _search(small: np.ndarray, tops: np.ndarray, sides: np.ndarray) -> tuple[float, float, float] | None:
    """The line with the largest step (contrast, top, side) among those through ``tops`` x ``sides``: the trimmed
    mean inside the triangle against that of a band of breast just outside, over the breast's spread."""
    sfg, _ = _foreground(small)
    spread = float(small[sfg].std()) if sfg.sum() > 16 else 0.0
    if spread <= 0:
        return None
    cols, rows = small.shape
    x = np.arange(cols, dtype=np.float64)[:, None]
    y = np.arange(rows, dtype=np.float64)[None, :]
    values = small[sfg]
    best: tuple[float, float, float] | None = None
    breast = float(sfg.sum())
    for y1 in sides:
        v = y / y1
        for x0 in tops:
            s = (x / x0 + v)[sfg]
            inside = s < 1.0
            band = (s >= 1.0) & (s < 1.0 + _BAND)
            n_in, n_band = int(inside.sum()), int(band.sum())
            if n_in < 6 or n_band < 6 or n_in > _MAX_SHARE * breast:
                continue
            contrast = (_trimmed_mean(values[inside]) - _trimmed_mean(values[band])) / spread
            if best is None or contrast > best[0]:
                best = (contrast, float(x0), float(y1))
    return best


def _triangle(shape: tuple[int, ...], line: PectoralLine, margin: float) -> np.ndarray:
    cols, rows = shape
    x = np.arange(cols, dtype=np.float64)[:, None]
    if line.chest_wall_right:
        x = (cols - 1) - x
    y = np.arange(rows, dtype=np.float64)[None, :]
    a, b = 1.0 / max(line.top, 1e-6), 1.0 / max(line.side, 1e-6)
    return np.asarray(x * a + y * b < 1.0 + margin * float(np.hypot(a, b)))


def pectoral_mask(image: np.ndarray, line: PectoralLine, *, margin: float = MARGIN) -> np.ndarray:
    """The muscle's pixels in ``image`` (``(columns, rows)``): the triangle the line cuts off, widened by ``margin``
    pixels across the line (the muscle's blurred edge would otherwise stay as a bright line), without the pixels
    denser than the muscle (``line.ceiling``: a mass projected over the muscle stays)."""
    image = np.asarray(image)
    return _triangle(image.shape, line, margin) & (image <= line.ceiling)


def remove_pectoral(image: np.ndarray) -> tuple[np.ndarray, PectoralLine | None]:
    """The image with its pectoral muscle set to the background level (the image's minimum), and the line found;
    the image unchanged and None when there is no muscle to find."""
    line = find_pectoral(image)
    if line is None:
        return image, None
    out = np.array(image, copy=True)
    out[pectoral_mask(out, line)] = out.min()
    return out, line
