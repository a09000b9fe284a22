"""A synthetic consortium of hospitals: real DICOM studies for the four cancer tasks, with known lesions.

Each site gets its own DICOM folder, a labels CSV and a record of every lesion (centre in patient
coordinates and voxel indices, radius, and a mask), so that models can be trained on it and saliency
maps checked against the truth. Sites differ the way hospitals do: scanner vendors and models, CT
slice thickness and rescale, MR gain, bias field and noise, mammography bit depth and photometric
interpretation, class balance, study counts, file naming and transfer syntax. One site writes its
prostate MR as enhanced multi-frame objects, another plans them oblique.

Anatomy is drawn analytically in patient coordinates (LPS, mm) and sampled at each voxel centre, so
any slice thickness, pixel spacing or oblique plane gives a consistent image and an exact lesion mask.

Usage::

    from imaging.synth import generate_consortium
    result = generate_consortium(Path("consortium"), sites=3, studies_per_task=24, seed=0)
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from imaging.presets import PRESETS

ALL_TASKS: tuple[str, ...] = ("lung-ct", "breast-mg", "colorectal-ct", "prostate-mr")
MARKER = "consortium.json"
FORMAT = "oncofed.synthetic-consortium/1"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's scanners and PACS export differ from the others'.

    Args:
        name: Site id (``site-a``...).
        vendors: Per modality: ``(Manufacturer, ManufacturerModelName)``.
        ct_thickness: CT slice thickness and spacing in mm.
        ct_pixel: CT pixel spacing in mm (at matrix scale 1).
        ct_storage: ``"int16"`` (signed, intercept 0), ``"uint12"`` (intercept -1024) or ``"uint16"``
            (intercept -8192).
        ct_offset_hu: Calibration offset of this site's CT in HU.
        ct_noise_hu: CT noise standard deviation in HU.
        ct_kvp: Tube voltage.
        ct_descending: Whether InstanceNumber 1 is the most cranial slice (head-first scanning).
        mr_field: Magnetic field strength in T.
        mr_gain: Scale of stored MR values (MR has no absolute unit).
        mr_noise: MR noise as a fraction of the fat signal.
        mr_enhanced: Write prostate MR as one enhanced multi-frame object per series.
        mr_oblique_deg: Tilt of the prostate MR plane about the patient's left-right axis.
        mg_bits: Mammography BitsStored.
        mg_monochrome1: Store mammograms as MONOCHROME1 (inverted grey scale).
        mg_gamma: Detector response exponent.
        prevalence: Fraction of lesion-positive studies.
        size_factor: Studies at this site relative to ``studies_per_task``.
        naming: File layout style: ``"patient-tree"``, ``"hashed"`` or ``"export"``.
        transfer_syntax: ``"explicit"`` or ``"implicit"`` VR little endian for uncompressed files.
        mg_compression: ``""``, ``"jpeg2000"`` (lossless) or ``"rle"`` for mammograms.
    """

    name: str
    vendors: dict[str, tuple[str, str]]
    ct_thickness: float
    ct_pixel: float
    ct_storage: str
    ct_offset_hu: float
    ct_noise_hu: float
    ct_kvp: float
    ct_descending: bool
    mr_field: float
    mr_gain: float
    mr_noise: float
    mr_enhanced: bool
    mr_oblique_deg: float
    mg_bits: int
    mg_monochrome1: bool
    mg_gamma: float
    prevalence: float
    size_factor: float
    naming: str
    transfer_syntax: str
    mg_compression: str


_BASE_PROFILES: tuple[dict[str, Any], ...] = (
    dict(
        vendors={"CT": ("SIEMENS", "SOMATOM Definition AS+"), "MR": ("SIEMENS", "MAGNETOM Skyra"),
                 "MG": ("HOLOGIC, Inc.", "Selenia Dimensions")},
        ct_thickness=5.0, ct_pixel=5.5, ct_storage="uint12", ct_offset_hu=0.0, ct_noise_hu=12.0, ct_kvp=120.0,
        ct_descending=True, mr_field=3.0, mr_gain=1.0, mr_noise=0.03, mr_enhanced=False, mr_oblique_deg=0.0,
        mg_bits=12, mg_monochrome1=False, mg_gamma=1.0, prevalence=0.5, size_factor=1.0, naming="patient-tree",
        transfer_syntax="explicit", mg_compression="",
    ),
    dict(
        vendors={"CT": ("GE MEDICAL SYSTEMS", "Revolution CT"), "MR": ("GE MEDICAL SYSTEMS", "SIGNA Artist"),
                 "MG": ("GE MEDICAL SYSTEMS", "Senographe Pristina")},
        ct_thickness=2.5, ct_pixel=5.2, ct_storage="int16", ct_offset_hu=12.0, ct_noise_hu=20.0, ct_kvp=100.0,
        ct_descending=False, mr_field=1.5, mr_gain=2.6, mr_noise=0.05, mr_enhanced=False, mr_oblique_deg=14.0,
        mg_bits=14, mg_monochrome1=True, mg_gamma=0.8, prevalence=0.35, size_factor=0.75, naming="hashed",
        transfer_syntax="implicit", mg_compression="rle",
    ),
    dict(
        vendors={"CT": ("Philips", "IQon - Spectral CT"), "MR": ("Philips Medical Systems", "Ingenia"),
                 "MG": ("SIEMENS", "Mammomat Revelation")},
        ct_thickness=3.0, ct_pixel=5.6, ct_storage="uint16", ct_offset_hu=-8.0, ct_noise_hu=16.0, ct_kvp=120.0,
        ct_descending=True, mr_field=3.0, mr_gain=0.45, mr_noise=0.04, mr_enhanced=True, mr_oblique_deg=0.0,
        mg_bits=12, mg_monochrome1=False, mg_gamma=1.25, prevalence=0.6, size_factor=1.25, naming="export",
        transfer_syntax="explicit", mg_compression="jpeg2000",
    ),
)


def site_names(n: int) -> list[str]:
    """``site-a``, ``site-b``, ... for ``n`` sites (at most 26)."""
    if not 1 <= n <= 26:
        raise ValueError(f"sites must be between 1 and 26, got {n}")
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


def site_profiles(n: int, seed: int) -> list[SiteProfile]:
    """The profiles of ``n`` sites: three distinct hospitals, then variations of them."""
    profiles = []
    for i, name in enumerate(site_names(n)):
        base = dict(_BASE_PROFILES[i % len(_BASE_PROFILES)])
        if i >= len(_BASE_PROFILES):  # later sites: the same vendors with their own settings
            rng = np.random.default_rng([seed, 7919, i])
            base.update(
                ct_thickness=float(rng.choice([2.0, 2.5, 3.0, 5.0])),
                ct_pixel=round(float(rng.uniform(5.0, 5.7)), 2),
                ct_offset_hu=round(float(rng.uniform(-15, 15)), 1),
                ct_noise_hu=round(float(rng.uniform(10, 22)), 1),
                mr_gain=round(float(rng.uniform(0.4, 3.0)), 2),
                mr_noise=round(float(rng.uniform(0.02, 0.05)), 3),
                prevalence=round(float(rng.uniform(0.35, 0.6)), 2),
                size_factor=round(float(rng.uniform(0.75, 1.25)), 2),
            )
        profiles.append(SiteProfile(name=name, **base))
    return profiles


# --------------------------------------------------------------------------------------------------
# Geometry: a voxel grid in patient coordinates
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Voxel centres of a volume (or a single plane) in LPS patient coordinates.

    Voxel ``(k, r, c)`` (slice, row, column) lies at
    ``origin + c * spacing[2] * row_dir + r * spacing[1] * col_dir + k * spacing[0] * normal``;
    ``row_dir`` and ``col_dir`` are the two triplets of ImageOrientationPatient. Slices are in
    ascending order along the normal, which is the order a reader produces.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    shape: tuple[int, int, int]  # (slices, rows, columns)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @staticmethod
    def centred(centre: Sequence[float] | np.ndarray, shape: tuple[int, int, int], spacing: tuple[float, float, float],
                tilt_deg: float = 0.0) -> Grid:
        """An axial grid (tilted about the left-right axis by ``tilt_deg``) centred on ``centre``."""
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


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume weight in [0, 1] from a signed distance (negative inside) in mm."""
    return np.clip(0.5 - signed / edge, 0.0, 1.0).astype(np.float32)


def ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray | None, centre: Sequence[float] | np.ndarray,
              radii: Sequence[float] | np.ndarray, edge: float) -> np.ndarray:
    """Soft ellipsoid (or an infinite elliptic cylinder along z when ``z`` is None)."""
    q = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    if z is not None:
        q = q + ((z - centre[2]) / radii[2]) ** 2
    r_min = min(radii[:3] if z is not None else radii[:2])
    return _soft((np.sqrt(q) - 1.0) * r_min, edge)


def paint(volume: np.ndarray, weight: np.ndarray, value: float | np.ndarray) -> None:
    """Blend ``value`` into ``volume`` with partial-volume ``weight`` (in place)."""
    volume *= 1.0 - weight
    volume += weight * value


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float | Sequence[float]) -> np.ndarray:
    """Correlated Gaussian noise with unit standard deviation."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field_ / max(float(field_.std()), 1e-6)


# --------------------------------------------------------------------------------------------------
# Studies and lesions
# --------------------------------------------------------------------------------------------------


@dataclass
class Lesion:
    """A lesion as drawn: centre (LPS mm), radius, kind and the soft weight it was painted with."""

    centre: np.ndarray
    radius_mm: float
    kind: str
    weight: np.ndarray  # partial-volume weight over the image grid


@dataclass
class Patient:
    """A synthetic patient of one site."""

    patient_id: str
    name: str
    sex: str
    birth_date: str
    body: float  # body size factor


@dataclass
class StudyPlan:
    """One study to generate."""

    site: SiteProfile
    task: str
    index: int
    label: int
    patient: Patient
    study_uid: str
    accession: str
    date: str
    time: str
    seed: tuple[int, ...]


@dataclass
class SiteResult:
    """What was written for one site."""

    name: str
    dicom_dir: Path
    labels_csv: Path
    lesions_json: Path
    studies: int
    positives: int
    files: int
    patients: int
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class ConsortiumResult:
    """What :func:`generate_consortium` wrote."""

    out: Path
    sites: list[SiteResult]
    seconds: float

    @property
    def files(self) -> int:
        return sum(s.files for s in self.sites)


def _lung_ct(rng: np.random.Generator, grid: Grid, label: int, body: float) -> tuple[np.ndarray, Lesion | None]:
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
        paint(hu, _soft(d - rng.uniform(0.8, 1.8), edge) * lung_mask, 40.0)
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


def _colorectal_ct(rng: np.random.Generator, grid: Grid, label: int,
                   body: float) -> tuple[np.ndarray, Lesion | None]:
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


def _prostate_mr(rng: np.random.Generator, grid: Grid, label: int, body: float,
                 centre: np.ndarray) -> tuple[np.ndarray, Lesion | None]:
    """T2-weighted signal in arbitrary units (fat about 1000)."""
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


def _mammogram(rng: np.random.Generator, rows: int, cols: int, spacing: float, label: int, view: str,
               lesion_pos: tuple[float, float] | None, density: float, breast: tuple[float, float],
               kind: str) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float] | None, float]:
    """A right breast (chest wall at the right edge), intensities in [0, 1] (1 = densest).

    Returns ``(image, lesion weight or None, lesion centre (row, col), lesion radius in mm)``.
    """
    r = np.arange(rows, dtype=np.float32)[:, None]
    c = np.arange(cols, dtype=np.float32)[None, :]
    ry, rx = breast[0] * rows, breast[1] * cols
    r0 = rows * (0.5 if view == "CC" else 0.55)
    q = np.sqrt(((r - r0) / ry) ** 2 + ((c - (cols - 1)) / rx) ** 2)
    inside = _soft((q - 1.0) * min(rx, ry), 1.5)
    depth = np.clip(1.0 - q, 0.0, 1.0)  # 0 at the skin, 1 at the chest wall
    tissue = smooth_noise(rng, (rows, cols), 3.0) + 0.6 * smooth_noise(rng, (rows, cols), 1.0)
    fibro = np.clip((tissue - (1.0 - 2 * density)) * 0.6, 0, 1) * np.clip(depth * 3, 0, 1)
    img = inside * (0.28 + 0.35 * np.sqrt(depth) + 0.22 * fibro)
    img += 0.15 * _soft((np.abs(q - 0.985) - 0.015) * min(rx, ry), 1.0) * inside  # skin line
    if view == "MLO":  # pectoral muscle in the upper chest-wall corner
        pect = _soft(((cols - 1 - c) / (0.35 * cols) + r / (0.45 * rows) - 1.0) * 20, 2.0)
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
            weight = _soft((d - rad * spikes) * spacing, spacing * 1.5)
            paint(img, weight, 0.97 + 0.03 * np.clip(tissue, -1, 1))  # denser than any normal tissue
        else:
            radius_mm = float(rng.uniform(6.0, 10.0))
            rad = radius_mm / spacing
            weight = np.zeros((rows, cols), np.float32)
            for _ in range(int(rng.integers(8, 16))):
                dr, dc = rng.uniform(-rad, rad, 2) * 0.8
                d = np.sqrt((r - centre[0] - dr) ** 2 + (c - centre[1] - dc) ** 2)
                dot = _soft((d - rng.uniform(0.6, 1.3)) * spacing, spacing)
                paint(img, dot, 0.98)
            d = np.sqrt((r - centre[0]) ** 2 + (c - centre[1]) ** 2)
            weight = _soft((d - rad) * spacing, spacing)
    return np.clip(img, 0, 1), weight, centre, radius_mm


# --------------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------------


def _base_dataset(plan: StudyPlan, sop_class: str, modality: str, series_uid: str, series_number: int,
                  description: str) -> Dataset:
    site = plan.site
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    implicit = site.transfer_syntax == "implicit"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = "ONCOFED_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = plan.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = plan.time
    ds.AccessionNumber = plan.accession
    ds.Modality = modality
    manufacturer, model = site.vendors[modality]
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = f"Synthetic Hospital {site.name[-1].upper()}"
    ds.StationName = f"{modality}{site.name[-1].upper()}01"
    ds.DeviceSerialNumber = f"{zlib.crc32(f'{site.name}/{modality}'.encode()) % 100000:05d}"
    ds.SoftwareVersions = "oncofed-synth 1"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = {"lung-ct": "CT CHEST", "colorectal-ct": "CT ABDOMEN PELVIS",
                           "prostate-mr": "MRI PROSTATE", "breast-mg": "MAMMOGRAPHY"}[plan.task]
    ds.SeriesDescription = description
    ds.PatientName = plan.patient.name
    ds.PatientID = plan.patient.patient_id
    ds.PatientBirthDate = plan.patient.birth_date
    ds.PatientSex = plan.patient.sex
    ds.PatientAge = f"{int(plan.date[:4]) - int(plan.patient.birth_date[:4]):03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = plan.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = plan.accession[-6:]
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_pixels_uint(ds: Dataset, bits: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0


def _ct_storage(site: SiteProfile) -> tuple[int, bool, float]:
    """``(bits stored, signed, intercept)``."""
    return {"int16": (16, True, 0.0), "uint12": (12, False, -1024.0), "uint16": (16, False, -8192.0)}[site.ct_storage]


def _write(ds: Dataset, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return 1


class _SeriesWriter:
    """Writes the files of a single-frame series fast: the header they share is encoded once.

    The elements that differ per slice (``varying``) are encoded per file and spliced in tag order
    between the pre-encoded runs of shared elements; the result is byte-identical to ``save_as``.
    """

    def __init__(self, template: Dataset, varying: Sequence[int]) -> None:
        self.meta = template.file_meta
        self.implicit = self.meta.TransferSyntaxUID == ImplicitVRLittleEndian
        self.charset = template.get("SpecificCharacterSet", "iso8859")
        self.varying = sorted(BaseTag(t) for t in varying)
        shared = [e for e in template if e.tag not in self.varying]
        self.runs: list[bytes] = []
        bounds = [*self.varying, BaseTag(0xFFFFFFFF)]
        start = 0
        for bound in bounds:
            end = start
            while end < len(shared) and shared[end].tag < bound:
                end += 1
            run = Dataset()
            for elem in shared[start:end]:
                run.add(elem)
            self.runs.append(self._encode(run))
            start = end

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = self.implicit
        write_dataset(fp, ds, self.charset)
        return fp.getvalue()

    def write(self, path: Path, values: Dataset) -> int:
        """Write one file whose varying elements are taken from ``values``."""
        self.meta.MediaStorageSOPInstanceUID = values.SOPInstanceUID
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, self.meta, enforce_standard=True)
        parts = [fp.getvalue()]
        for run, tag in zip(self.runs, self.varying, strict=False):
            parts.append(run)
            one = Dataset()
            one.add(values[tag])
            parts.append(self._encode(one))
        parts.append(self.runs[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(parts))
        return 1


class _Namer:
    """File names in the site's export style."""

    def __init__(self, site: SiteProfile, root: Path, rng: np.random.Generator) -> None:
        self.site, self.root, self.rng = site, root, rng

    def series_dir(self, plan: StudyPlan, series_number: int, description: str) -> Path:
        if self.site.naming == "patient-tree":
            safe = "".join(ch if ch.isalnum() else "_" for ch in description)
            return self.root / plan.patient.patient_id / f"{plan.date}_{plan.accession}" / f"{series_number:03d}_{safe}"
        if self.site.naming == "export":
            return (self.root / "DICOM" / f"P{plan.patient.patient_id[-5:]}" / f"S{plan.index:05d}"
                    / f"S{series_number:05d}")
        return self.root / f"{int(self.rng.integers(0, 256)):02x}"

    def file(self, folder: Path, number: int) -> Path:
        if self.site.naming == "patient-tree":
            return folder / f"IM-{number:04d}.dcm"
        if self.site.naming == "export":
            return folder / f"I{int(self.rng.integers(0, 10**7)):07d}"
        return folder / f"{int(self.rng.integers(0, 2**62)):016x}"


def _lesion_record(plan: StudyPlan, series_uid: str, sop_uid: str | None, lesion: Lesion, grid: Grid | None,
                   voxel: tuple[float, float, float], mask: np.ndarray, mask_path: str) -> dict[str, Any]:
    k, r, c = (int(round(v)) for v in voxel)
    return {
        "study_instance_uid": plan.study_uid,
        "series_instance_uid": series_uid,
        "sop_instance_uid": sop_uid,
        "task": plan.task,
        "label": 1,
        "kind": lesion.kind,
        "radius_mm": round(lesion.radius_mm, 2),
        "center_patient_mm": [round(float(v), 2) for v in lesion.centre] if grid is not None else None,
        "center_voxel": ({"col": c, "row": r, "slice": k} if grid is not None else {"col": c, "row": r}),
        "mask": mask_path,
        "mask_voxels": int(mask.sum()),
    }


def _save_mask(site_dir: Path, key: str, mask: np.ndarray) -> str:
    rel = Path("masks") / f"{key}.npz"
    (site_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(site_dir / rel, mask=mask)
    return rel.as_posix()


def _mask_of(weight: np.ndarray, voxel: tuple[float, ...]) -> np.ndarray:
    mask = weight >= 0.5
    idx = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(voxel, weight.shape, strict=False))
    mask[idx] = True  # a lesion smaller than a voxel still marks its voxel
    return mask


VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def _slice_values(sop_uid: str, number: int, position: np.ndarray, location: float, pixels: np.ndarray) -> Dataset:
    values = Dataset()
    values.SOPInstanceUID = sop_uid
    values.InstanceNumber = number
    values.ImagePositionPatient = [round(float(v), 4) for v in position]
    values.SliceLocation = round(location, 4)
    values.add_new(0x7FE00010, "OW", pixels.tobytes())
    return values


def _write_series(template: Dataset, slices: list[tuple[Path, Dataset]]) -> int:
    """Write a single-frame series: the template's shared header plus each slice's values."""
    writer = _SeriesWriter(template, VARYING)
    return sum(writer.write(path, values) for path, values in slices)


def _write_ct(plan: StudyPlan, rng: np.random.Generator, site_dir: Path, namer: _Namer,
              scale: int) -> tuple[int, list[dict[str, Any]]]:
    site = plan.site
    cols = rows = 64 * scale
    pixel = site.ct_pixel * rng.uniform(0.97, 1.03) / scale
    n = int(round(160.0 / site.ct_thickness))
    table = rng.uniform(-15, 15)
    centre = (rng.uniform(-5, 5), table, rng.uniform(-300, -200) if plan.task == "colorectal-ct" else
              rng.uniform(-150, -80))
    grid = Grid.centred(centre, (n, rows, cols), (site.ct_thickness, pixel, pixel))
    draw = _lung_ct if plan.task == "lung-ct" else _colorectal_ct
    hu, lesion = draw(rng, grid, plan.label, plan.patient.body)
    noise = smooth_noise(rng, grid.shape, (0.3, 0.7, 0.7)) * site.ct_noise_hu
    hu = hu + noise + site.ct_offset_hu
    yy, xx = np.mgrid[:rows, :cols]
    fov = ((yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2) > (rows / 2) ** 2
    hu[:, fov] = -1024.0  # outside the reconstruction circle
    bits, signed, intercept = _ct_storage(site)
    stored = np.rint(hu - intercept)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.clip(stored, lo, hi).astype(np.int16 if signed else np.uint16)

    series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "2"])
    desc = (f"Thorax {site.ct_thickness:.1f} Br40" if plan.task == "lung-ct" else f"AP PV {site.ct_thickness:.1f}")
    ds = _base_dataset(plan, CT_IMAGE, "CT", series_uid, 2, desc)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if site.name != "site-c":  # one site leaves this optional tag out, as some scanners do
        ds.BodyPartExamined = "CHEST" if plan.task == "lung-ct" else "ABDOMEN"
    else:
        ds.Laterality = ""
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[plan.study_uid, "for"])
    ds.PositionReferenceIndicator = ""
    ds.KVP = site.ct_kvp
    ds.XRayTubeCurrent = int(rng.integers(120, 320))
    ds.ConvolutionKernel = "Br40" if "SIEMENS" in site.vendors["CT"][0] else "STANDARD"
    ds.SliceThickness = site.ct_thickness
    ds.SpacingBetweenSlices = site.ct_thickness
    ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
    ds.ImageOrientationPatient = [float(v) for v in (*grid.row_dir, *grid.col_dir)]
    ds.Rows, ds.Columns = rows, cols
    _set_pixels_uint(ds, bits, signed)
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = ([-600, 1500] if plan.task == "lung-ct" else [40, 400])
    folder = namer.series_dir(plan, 2, desc)
    slices = []
    for k in range(n):
        pos = grid.position(k)
        slices.append((namer.file(folder, (n - k) if site.ct_descending else (k + 1)), _slice_values(
            generate_uid(entropy_srcs=[series_uid, str(k)]), (n - k) if site.ct_descending else (k + 1), pos,
            float(pos[2]), stored[k])))
    _write_series(ds, slices)
    records = []
    if lesion is not None:
        voxel = grid.voxel(lesion.centre)
        mask = _mask_of(lesion.weight, voxel)
        rel = _save_mask(site_dir, series_uid, mask)
        records.append(_lesion_record(plan, series_uid, None, lesion, grid, voxel, mask, rel))
    return n, records


def _mr_common(ds: Dataset, site: SiteProfile) -> None:
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = ["SK", "SP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 4500.0 if site.mr_field >= 3 else 5200.0
    ds.EchoTime = 104.0
    ds.EchoTrainLength = 16
    ds.MagneticFieldStrength = site.mr_field
    ds.ImagingFrequency = round(42.577 * site.mr_field, 4)
    ds.ImagedNucleus = "1H"


def _write_mr(plan: StudyPlan, rng: np.random.Generator, site_dir: Path, namer: _Namer,
              scale: int) -> tuple[int, list[dict[str, Any]]]:
    site = plan.site
    rows = cols = 64 * scale
    pixel = rng.uniform(2.8, 3.1) / scale
    n = int(rng.integers(20, 25))
    thickness = 3.5 if site.mr_field < 3 else 3.0
    prostate = np.array([rng.uniform(-5, 5), rng.uniform(20, 35), rng.uniform(-420, -380)])
    centre = prostate + np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-5, 5)])
    grid = Grid.centred(centre, (n, rows, cols), (thickness, pixel, pixel), site.mr_oblique_deg)
    signal, lesion = _prostate_mr(rng, grid, plan.label, plan.patient.body, prostate)
    sigma = site.mr_noise * 1000.0
    signal = np.sqrt((signal + sigma * rng.standard_normal(signal.shape)) ** 2
                     + (sigma * rng.standard_normal(signal.shape)) ** 2)  # Rician magnitude noise
    stored = np.clip(np.rint(signal * site.mr_gain * rng.uniform(0.9, 1.1)), 0, 4095).astype(np.uint16)

    series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "5"])
    desc = "t2_tse_tra" if site.mr_oblique_deg == 0 else "T2 FSE OBL AX"
    folder = namer.series_dir(plan, 5, desc)
    frame_of_reference = generate_uid(entropy_srcs=[plan.study_uid, "for"])
    orientation = [round(float(v), 6) for v in (*grid.row_dir, *grid.col_dir)]
    files = 0
    if site.mr_enhanced:
        ds = _base_dataset(plan, ENHANCED_MR_IMAGE, "MR", series_uid, 5, desc)
        _enhanced_mr(ds, site, grid, orientation, frame_of_reference, plan)
        order = np.arange(n)[::-1]  # frames stored head to feet
        ds.NumberOfFrames = n
        ds.PerFrameFunctionalGroupsSequence = DicomSequence([_mr_frame(grid, int(k), plan) for k in order])
        ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "enhanced"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 1
        files += _write(ds, namer.file(folder, 1))
    else:
        ds = _base_dataset(plan, MR_IMAGE, "MR", series_uid, 5, desc)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
        ds.BodyPartExamined = "PROSTATE"
        ds.PatientPosition = "FFS"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        _mr_common(ds, site)
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
        ds.ImageOrientationPatient = orientation
        ds.Rows, ds.Columns = rows, cols
        _set_pixels_uint(ds, 12, False)
        ds.WindowCenter, ds.WindowWidth = int(700 * site.mr_gain), int(1400 * site.mr_gain)
        slices = []
        for k in range(n):
            pos = grid.position(k)
            slices.append((namer.file(folder, k + 1), _slice_values(
                generate_uid(entropy_srcs=[series_uid, str(k)]), k + 1, pos, float(pos @ grid.normal), stored[k])))
        files += _write_series(ds, slices)
    records = []
    if lesion is not None:
        voxel = grid.voxel(lesion.centre)
        mask = _mask_of(lesion.weight, voxel)
        rel = _save_mask(site_dir, series_uid, mask)
        records.append(_lesion_record(plan, series_uid, None, lesion, grid, voxel, mask, rel))
    return files, records


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _item(**tags: Any) -> Dataset:
    item = Dataset()
    for key, value in tags.items():
        setattr(item, key, value)
    return item


def _enhanced_mr(ds: Dataset, site: SiteProfile, grid: Grid, orientation: list[float], frame_of_reference: str,
                 plan: StudyPlan) -> None:
    """The modules of an Enhanced MR Image object (shared functional groups included)."""
    n, rows, cols = grid.shape
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T2"
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = site.mr_field
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ImageComments = "synthetic"
    ds.AcquisitionDateTime = plan.date + plan.time
    ds.AcquisitionDuration = 180.0
    ds.AcquisitionNumber = 1
    ds.PulseSequenceName = "TSE"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "YES"
    ds.MultiPlanarExcitation = "YES"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "PROSTATE"
    ds.PatientPosition = "FFS"
    ds.Rows, ds.Columns = rows, cols
    _set_pixels_uint(ds, 12, False)
    ds.ContentDate, ds.ContentTime = plan.date, plan.time
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.AcquisitionContextSequence = DicomSequence([])
    dimension_org = generate_uid(entropy_srcs=[plan.study_uid, "dimension"])
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=dimension_org))
    ds.DimensionIndexSequence = _seq(
        _item(DimensionOrganizationUID=dimension_org, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position"),
    )
    pixel = grid.spacing[1]
    shared = _item(
        PixelMeasuresSequence=_seq(_item(PixelSpacing=[round(pixel, 6), round(pixel, 6)],
                                         SliceThickness=grid.spacing[0],
                                         SpacingBetweenSlices=grid.spacing[0])),
        PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=orientation)),
        FrameVOILUTSequence=_seq(_item(WindowCenter=int(700 * site.mr_gain), WindowWidth=int(1400 * site.mr_gain))),
        MRTimingAndRelatedParametersSequence=_seq(_item(
            RepetitionTime=4500.0, FlipAngle=150.0, EchoTrainLength=16, RFEchoTrainLength=16,
            GradientEchoTrainLength=0, GradientOutputType="DB_DT", GradientOutput=45.0,
            SpecificAbsorptionRateSequence=_seq(_item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                                      SpecificAbsorptionRateValue=0.9)),
            OperatingModeSequence=_seq(_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
                                       _item(OperatingModeType="RF", OperatingMode="IEC_NORMAL"),
                                       _item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL")))),
        MRFOVGeometrySequence=_seq(_item(
            InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=cols,
            MRAcquisitionPhaseEncodingStepsInPlane=rows, PercentSampling=100.0, PercentPhaseFieldOfView=100.0)),
        MREchoSequence=_seq(_item(EffectiveEchoTime=104.0)),
        MRModifierSequence=_seq(_item(InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
                                      SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE",
                                      PartialFourier="NO", ParallelAcquisition="NO")),
        MRImagingModifierSequence=_seq(_item(MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
                                             TransmitterFrequency=round(42.577 * site.mr_field, 4),
                                             PixelBandwidth=200.0)),
        MRReceiveCoilSequence=_seq(_item(ReceiveCoilName="Body18", ReceiveCoilType="MULTICOIL",
                                         ReceiveCoilManufacturerName=site.vendors["MR"][0],
                                         QuadratureReceiveCoil="NO",
                                         MultiCoilDefinitionSequence=_seq(_item(MultiCoilElementName="BO1",
                                                                                MultiCoilElementUsed="YES")))),
        MRTransmitCoilSequence=_seq(_item(TransmitCoilName="Body", TransmitCoilType="BODY",
                                          TransmitCoilManufacturerName=site.vendors["MR"][0])),
        MRAveragesSequence=_seq(_item(NumberOfAverages=2.0)),
        FrameAnatomySequence=_seq(_item(FrameLaterality="U", AnatomicRegionSequence=_seq(
            _code("41216001", "SCT", "Prostate")))),
        PixelValueTransformationSequence=_seq(_item(RescaleIntercept=0.0, RescaleSlope=1.0, RescaleType="US")),
        MRImageFrameTypeSequence=_seq(_item(FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"],
                                            PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
                                            VolumeBasedCalculationTechnique="NONE",
                                            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T2")),
    )
    ds.SharedFunctionalGroupsSequence = _seq(shared)


def _mr_frame(grid: Grid, k: int, plan: StudyPlan) -> Dataset:
    return _item(
        FrameContentSequence=_seq(_item(
            FrameAcquisitionNumber=1, FrameReferenceDateTime=plan.date + plan.time,
            FrameAcquisitionDateTime=plan.date + plan.time, FrameAcquisitionDuration=180.0,
            StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[k + 1])),
        PlanePositionSequence=_seq(_item(ImagePositionPatient=[round(float(v), 4) for v in grid.position(k)])),
    )


def _write_mg(plan: StudyPlan, rng: np.random.Generator, site_dir: Path, namer: _Namer,
              scale: int) -> tuple[int, list[dict[str, Any]]]:
    site = plan.site
    rows, cols = 160 * scale, 128 * scale
    spacing = rng.uniform(0.78, 0.82) / scale
    laterality = "R" if rng.random() < 0.5 else "L"
    density = float(rng.uniform(0.2, 0.8))
    breast = (float(rng.uniform(0.36, 0.46)), float(rng.uniform(0.62, 0.85)))
    kind = "mass" if rng.random() < 0.7 else "calcification cluster"
    depth = float(rng.uniform(0.25, 0.7))  # fraction of the breast depth from the chest wall
    views = {"CC": rng.uniform(0.35, 0.65), "MLO": rng.uniform(0.3, 0.6)}
    series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "1"])
    files, records = 0, []
    max_value = 2**site.mg_bits - 1
    for number, view in enumerate(("CC", "MLO"), start=1):
        pos = (float(views[view]), depth) if plan.label else None
        img, weight, centre, radius_mm = _mammogram(rng, rows, cols, spacing, plan.label, view, pos, density,
                                                    breast, kind)
        img = img + 0.01 * rng.standard_normal(img.shape).astype(np.float32)
        value = np.clip(img, 0, 1) ** site.mg_gamma * 0.92 * max_value
        stored = np.clip(np.rint(value), 0, max_value).astype(np.uint16)
        if laterality == "L":
            stored = stored[:, ::-1]
            if weight is not None and centre is not None:
                weight = weight[:, ::-1]
                centre = (centre[0], cols - 1 - centre[1])
        if site.mg_monochrome1:
            stored = (max_value - stored).astype(np.uint16)
        desc = f"{laterality} {view}"
        ds = _base_dataset(plan, MG_FOR_PRESENTATION, "MG", series_uid, 1, desc)
        _mg_tags(ds, site, laterality, view, spacing, rows, cols, rng)
        sop = generate_uid(entropy_srcs=[series_uid, view])
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = number
        stored = np.ascontiguousarray(stored)
        if site.mg_compression:
            syntax = JPEG2000Lossless if site.mg_compression == "jpeg2000" else RLELossless
            ds.compress(syntax, stored, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless else "",
                        generate_instance_uid=False)
        else:
            ds.PixelData = stored.tobytes()
        files += _write(ds, namer.file(namer.series_dir(plan, 1, "MG"), number))
        if weight is not None and centre is not None:
            voxel = (centre[0], centre[1])
            mask = _mask_of(np.ascontiguousarray(weight), voxel)
            rel = _save_mask(site_dir, sop, mask)
            lesion = Lesion(np.array([np.nan] * 3), radius_mm, kind, weight)
            record = _lesion_record(plan, series_uid, sop, lesion, None, (0.0, *voxel), mask, rel)
            record["laterality"], record["view"] = laterality, view
            records.append(record)
    return files, records


def _mg_tags(ds: Dataset, site: SiteProfile, laterality: str, view: str, spacing: float, rows: int, cols: int,
             rng: np.random.Generator) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PatientOrientation = (["P", "L"] if view == "CC" else ["P", "FL"]) if laterality == "R" else \
        (["A", "R"] if view == "CC" else ["A", "FR"])
    ds.ViewCodeSequence = _seq(_item(
        CodeValue="399162004" if view == "CC" else "399368009", CodingSchemeDesignator="SCT",
        CodeMeaning="cranio-caudal" if view == "CC" else "medio-lateral oblique",
        ViewModifierCodeSequence=DicomSequence([])))
    ds.AnatomicRegionSequence = _seq(_code("76752008", "SCT", "Breast"))
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.DistanceSourceToDetector = 660.0
    ds.DistanceSourceToPatient = 640.0
    ds.PositionerPrimaryAngle = 0.0 if view == "CC" else (45.0 if laterality == "R" else -45.0)
    ds.BreastImplantPresent = "NO"
    ds.OrganExposed = "BREAST"
    ds.KVP = round(float(rng.uniform(27, 33)), 1)
    ds.ExposureInuAs = int(rng.integers(40000, 160000))
    ds.BodyPartThickness = round(float(rng.uniform(35, 65)), 1)
    ds.CompressionForce = round(float(rng.uniform(60, 140)), 1)
    ds.ImagerPixelSpacing = [round(spacing, 6), round(spacing, 6)]
    ds.DetectorType = "DIRECT"
    ds.Rows, ds.Columns = rows, cols
    _set_pixels_uint(ds, site.mg_bits, False)
    if site.mg_monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0.0
    ds.RescaleSlope = 1.0
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if site.mg_monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter = int(0.55 * 2**site.mg_bits)
    ds.WindowWidth = int(0.8 * 2**site.mg_bits)
    ds.AcquisitionContextSequence = DicomSequence([])


WRITERS = {"lung-ct": _write_ct, "colorectal-ct": _write_ct, "prostate-mr": _write_mr, "breast-mg": _write_mg}


# --------------------------------------------------------------------------------------------------
# Site and consortium
# --------------------------------------------------------------------------------------------------


def _studies_for_site(site: SiteProfile, site_index: int, tasks: Sequence[str], studies_per_task: int,
                      seed: int) -> list[StudyPlan]:
    """Patients and studies of one site, with labels at the site's prevalence."""
    rng = np.random.default_rng([seed, site_index, 1])
    patients: list[Patient] = []
    plans: list[StudyPlan] = []
    letter = site.name[-1].upper()

    def new_patient(sex: str) -> Patient:
        i = len(patients) + 1
        born = int(rng.integers(1940, 1980))
        p = Patient(
            patient_id=f"{letter}{int(rng.integers(10**6, 10**7))}{i:03d}",
            name=f"SYNTHETIC^{letter}{i:04d}",
            sex=sex,
            birth_date=f"{born}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
            body=float(rng.uniform(0.9, 1.1)),
        )
        patients.append(p)
        return p

    for task_index, task in enumerate(tasks):
        n = max(4, int(round(studies_per_task * site.size_factor)))
        positives = min(max(2, int(round(n * site.prevalence))), n - 2)
        labels = np.array([1] * positives + [0] * (n - positives))
        rng.shuffle(labels)
        sex_rule = {"breast-mg": "F", "prostate-mr": "M"}.get(task)
        for i in range(n):
            sex = sex_rule or str(rng.choice(["F", "M"]))
            earlier = [p for p in patients if p.sex == sex]
            patient = earlier[int(rng.integers(0, len(earlier)))] if earlier and rng.random() < 0.2 else \
                new_patient(sex)
            year = int(rng.integers(2019, 2026))
            date = f"{year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            accession = f"{letter}{year % 100:02d}{task_index}{i:04d}{int(rng.integers(100, 1000))}"
            study_uid = generate_uid(entropy_srcs=[str(seed), site.name, task, str(i), "study"])
            plans.append(StudyPlan(site, task, i, int(labels[i]), patient, study_uid, accession, date,
                                   f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
                                   (seed, site_index, task_index, i)))
    return plans


def _generate_site(root: Path, site: SiteProfile, site_index: int, tasks: Sequence[str], studies_per_task: int,
                   seed: int, scale: int, progress: Progress | None, done: list[int], total: int) -> SiteResult:
    site_dir = root / site.name
    dicom_dir = site_dir / "dicom"
    plans = _studies_for_site(site, site_index, tasks, studies_per_task, seed)
    namer = _Namer(site, dicom_dir, np.random.default_rng([seed, site_index, 2]))
    files = 0
    lesions: list[dict[str, Any]] = []
    per_task: dict[str, dict[str, int]] = {}
    for plan in plans:
        rng = np.random.default_rng(list(plan.seed))
        n, records = WRITERS[plan.task](plan, rng, site_dir, namer, scale)
        files += n
        lesions.extend(records)
        counts = per_task.setdefault(plan.task, {"studies": 0, "positives": 0})
        counts["studies"] += 1
        counts["positives"] += plan.label
        done[0] += 1
        if progress is not None:
            progress(done[0], total, site.name)
    labels_csv = site_dir / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_instance_uid", "task", "label"])
        for plan in plans:
            writer.writerow([plan.study_uid, plan.task, plan.label])
    lesions_json = site_dir / "lesions.json"
    lesions_json.write_text(json.dumps(lesions, indent=1))
    return SiteResult(
        name=site.name, dicom_dir=dicom_dir, labels_csv=labels_csv, lesions_json=lesions_json,
        studies=len(plans), positives=sum(p.label for p in plans), files=files,
        patients=len({p.patient.patient_id for p in plans}), per_task=per_task,
    )


def _site_worker(args: tuple[Any, ...]) -> SiteResult:
    out, profile, i, task_list, studies_per_task, seed, scale, queue = args

    def report(done: int, total: int, site: str) -> None:
        queue.put(site)

    return _generate_site(out, profile, i, task_list, studies_per_task, seed, scale, report, [0], 0)


def _generate_parallel(out: Path, profiles: list[SiteProfile], task_list: list[str], studies_per_task: int,
                       seed: int, scale: int, progress: Progress | None, total: int, workers: int) -> list[SiteResult]:
    """One process per site (at most ``workers`` at a time); progress comes back through a queue."""
    # fork: works without a __main__ guard in the caller; the workers never touch torch.
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager:
        queue = manager.Queue()
        jobs = [(out, p, i, task_list, studies_per_task, seed, scale, queue) for i, p in enumerate(profiles)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_site_worker, job) for job in jobs]
            done = 0
            while done < total:
                try:
                    site = queue.get(timeout=0.2)
                except Empty:
                    if all(f.done() for f in futures):
                        break
                    continue
                done += 1
                if progress is not None:
                    progress(done, total, site)
            return [f.result() for f in futures]


def validate_tasks(tasks: Iterable[str]) -> list[str]:
    """The tasks as a list; raises ValueError naming an unknown task and the known ones."""
    out = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in out if t not in WRITERS or t not in PRESETS]
    if unknown or not out:
        raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; known tasks: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(out))


def generate_consortium(
    out: Path | str,
    *,
    sites: int = 3,
    studies_per_task: int = 24,
    seed: int = 0,
    tasks: Iterable[str] = ALL_TASKS,
    scale: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
    workers: int | None = None,
) -> ConsortiumResult:
    """Write a synthetic consortium under ``out``.

    Layout: ``out/<site>/dicom/...`` (DICOM files), ``out/<site>/labels.csv``
    (``study_instance_uid,task,label``), ``out/<site>/lesions.json`` (one record per lesion: study,
    series and, for 2D, SOP instance UID; centre in patient mm and voxel indices ``col,row,slice`` in
    the reader's spatial order; radius; kind; the mask file ``masks/<key>.npz`` holding ``mask`` of
    shape ``(slices, rows, cols)`` or ``(rows, cols)``), and ``out/consortium.json``.

    Args:
        out: The folder (created). It must be empty or an earlier consortium (then ``overwrite``).
        sites: Number of hospitals (1-26).
        studies_per_task: Studies per task at a site of size factor 1 (sites vary by ±25 %; at least 4).
        seed: Everything follows from it.
        tasks: Which tasks to write.
        scale: In-plane matrix multiplier (1 = the CPU-friendly default; 8 gives 512×512 CT).
        overwrite: Replace an earlier consortium in ``out``.
        progress: Called as ``progress(done, total, site)`` after each study.
        workers: Processes writing sites in parallel (default: one per core, at most one per site).
            The output does not depend on it.

    Raises:
        ValueError: Bad arguments (message names the argument).
        FileExistsError: ``out`` holds something else.
    """
    out = Path(out)
    task_list = validate_tasks(tasks)
    if studies_per_task < 4:
        raise ValueError(f"studies_per_task must be at least 4 (2 per class), got {studies_per_task}")
    if not 1 <= scale <= 16:
        raise ValueError(f"scale must be between 1 and 16, got {scale}")
    profiles = site_profiles(sites, seed)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out} is not empty and holds no synthetic consortium; choose an empty folder")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a synthetic consortium; replace it with --force "
                                  "(overwrite=True)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = sum(max(4, int(round(studies_per_task * p.size_factor))) for p in profiles) * len(task_list)
    workers = min(len(profiles), workers or os.cpu_count() or 1)
    if workers <= 1:
        done = [0]
        results = [
            _generate_site(out, profile, i, task_list, studies_per_task, seed, scale, progress, done, total)
            for i, profile in enumerate(profiles)
        ]
    else:
        results = _generate_parallel(out, profiles, task_list, studies_per_task, seed, scale, progress, total,
                                     workers)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "seed": seed,
        "sites": len(profiles),
        "studies_per_task": studies_per_task,
        "tasks": task_list,
        "scale": scale,
        "profiles": [asdict(p) for p in profiles],
        "results": [
            {"site": r.name, "studies": r.studies, "positives": r.positives, "files": r.files, "patients": r.patients,
             "per_task": r.per_task}
            for r in results
        ],
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=1))
    return ConsortiumResult(out=out, sites=results, seconds=seconds)
