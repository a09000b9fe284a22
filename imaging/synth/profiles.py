"""Site profiles: how each synthetic hospital's scanners and PACS export differ from the others'."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["UNLIKE_SCANNERS", "SiteProfile", "site_names", "site_profiles"]


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
        mr_enhanced: Write MR as one enhanced multi-frame object per series.
        mr_oblique_deg: Tilt of the MR plane about the patient's left-right axis.
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


_BASE_PROFILES: tuple[Mapping[str, Any], ...] = tuple(MappingProxyType(p) for p in (
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
))


# The scanners of a site unlike the others (the non-IID variant of a consortium): an older, low-dose CT with thick
# slices and a calibration drift, a noisy 1.5 T MR, a mammography detector with a much steeper response. Everything
# else about the site (its PACS export, its size, its prevalence) stays as it was, so that only the scanner differs.
UNLIKE_SCANNERS: Mapping[str, Any] = MappingProxyType(dict(
    vendors={"CT": ("TOSHIBA", "Aquilion 16"), "MR": ("Hitachi", "Echelon Oval"), "MG": ("FUJIFILM", "AMULET")},
    ct_thickness=5.0, ct_offset_hu=35.0, ct_noise_hu=40.0, ct_kvp=80.0, mr_field=1.5, mr_gain=3.5, mr_noise=0.10,
    mg_gamma=1.7,
))


def site_names(n: int) -> list[str]:
    """The ids of ``n`` sites: ``site-a``, ``site-b``, ...

    Args:
        n: Number of sites.

    Returns:
        One id per site, in order.

    Raises:
        ValueError: ``n`` is not between 1 and 26.
    """
    if not 1 <= n <= 26:
        raise ValueError(f"sites must be between 1 and 26, got {n}")
    return [f"site-{chr(ord('a') + i)}" for i in range(n)]


def site_profiles(n: int, seed: int, *, unlike: str | None = None) -> list[SiteProfile]:
    """The profiles of ``n`` sites: three distinct hospitals, then variations of them.

    Args:
        n: Number of sites (1-26).
        seed: Seeds the settings of the fourth and later sites.
        unlike: A site whose scanners are unlike all the others' (:data:`UNLIKE_SCANNERS`): the non-IID variant.

    Returns:
        One profile per site, in the order of :func:`site_names`.

    Raises:
        ValueError: ``n`` is not between 1 and 26, or ``unlike`` is not one of the sites.
    """
    if unlike is not None and unlike not in site_names(n):
        raise ValueError(f"unlike: {unlike!r} is not one of the {n} sites ({', '.join(site_names(n))})")
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
        if name == unlike:
            base.update(UNLIKE_SCANNERS)
        profiles.append(SiteProfile(name=name, **base))
    return profiles
