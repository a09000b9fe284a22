"""File names in each site's export style: a patient tree, hashed folders or a PACS export layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imaging.synth.profiles import SiteProfile
from imaging.synth.study import StudyPlan

__all__ = ["Namer"]


class Namer:
    """File names in the site's export style (``SiteProfile.naming``).

    Args:
        site: The site's profile.
        root: The site's DICOM folder.
        rng: Draws the random parts of hashed and exported names (one per site, used in study order).
    """

    def __init__(self, site: SiteProfile, root: Path, rng: np.random.Generator) -> None:
        self.site, self.root, self.rng = site, root, rng

    def series_dir(self, plan: StudyPlan, series_number: int, *, description: str) -> Path:
        """The folder of one series.

        Args:
            plan: The study.
            series_number: SeriesNumber.
            description: SeriesDescription (used by the patient-tree layout).

        Returns:
            The folder (not created).
        """
        if self.site.naming == "patient-tree":
            safe = "".join(ch if ch.isalnum() else "_" for ch in description)
            return self.root / plan.patient.patient_id / f"{plan.date}_{plan.accession}" / f"{series_number:03d}_{safe}"
        if self.site.naming == "export":
            return (self.root / "DICOM" / f"P{plan.patient.patient_id[-5:]}" / f"S{plan.index:05d}"
                    / f"S{series_number:05d}")
        return self.root / f"{int(self.rng.integers(0, 256)):02x}"

    def file(self, folder: Path, number: int) -> Path:
        """The path of one file in ``folder``.

        Args:
            folder: From :meth:`series_dir`.
            number: InstanceNumber (used by the patient-tree layout).

        Returns:
            The path (not created).
        """
        if self.site.naming == "patient-tree":
            return folder / f"IM-{number:04d}.dcm"
        if self.site.naming == "export":
            return folder / f"I{int(self.rng.integers(0, 10**7)):07d}"
        return folder / f"{int(self.rng.integers(0, 2**62)):016x}"
