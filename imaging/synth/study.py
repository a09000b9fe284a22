"""What one synthetic study is (patient, identifiers, seed) and the truth recorded about its lesion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imaging.synth.geometry import Grid
from imaging.synth.profiles import SiteProfile

__all__ = ["Lesion", "Patient", "StudyPlan", "lesion_record", "mask_of", "save_mask", "volume_lesion_record"]


@dataclass(frozen=True)
class Lesion:
    """A lesion as drawn.

    Args:
        centre: Centre in LPS patient mm (NaN for a projection image).
        radius_mm: Radius in mm.
        kind: What it is (``"solid nodule"``, ``"mass"``...).
        weight: The partial-volume weight it was painted with, over the image grid.
    """

    centre: np.ndarray
    radius_mm: float
    kind: str
    weight: np.ndarray


@dataclass(frozen=True)
class Patient:
    """A synthetic patient of one site.

    Args:
        patient_id: PatientID.
        name: PatientName.
        sex: PatientSex (``"F"`` or ``"M"``).
        birth_date: PatientBirthDate (``YYYYMMDD``).
        body: Body size factor (about 0.9-1.1).
    """

    patient_id: str
    name: str
    sex: str
    birth_date: str
    body: float


@dataclass(frozen=True)
class StudyPlan:
    """One study to generate.

    Args:
        site: The site's profile.
        task: The task (a preset name) the study is for.
        index: The study's number within its task at the site.
        label: 1 if it has a lesion, else 0.
        patient: Whose study it is.
        study_uid: StudyInstanceUID.
        accession: AccessionNumber.
        date: StudyDate (``YYYYMMDD``).
        time: StudyTime (``HHMMSS``).
        seed: Seeds the study's random source.
    """

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


def mask_of(weight: np.ndarray, voxel: tuple[float, ...]) -> np.ndarray:
    """The binary mask of a lesion: its weight of at least 0.5, and always its centre voxel.

    Args:
        weight: The lesion's partial-volume weight.
        voxel: Its centre in (fractional) array indices.

    Returns:
        A boolean array shaped like ``weight``.
    """
    mask = weight >= 0.5
    idx = tuple(int(np.clip(round(v), 0, s - 1)) for v, s in zip(voxel, weight.shape, strict=False))
    mask[idx] = True  # a lesion smaller than a voxel still marks its voxel
    return mask


def save_mask(site_dir: Path, key: str, *, mask: np.ndarray) -> str:
    """Write ``mask`` to ``site_dir/masks/<key>.npz`` (array ``mask``).

    Args:
        site_dir: The site's output folder.
        key: The file stem (the series or SOP instance UID).
        mask: The lesion mask.

    Returns:
        The file's path relative to ``site_dir`` (POSIX).
    """
    rel = Path("masks") / f"{key}.npz"
    (site_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(site_dir / rel, mask=mask)
    return rel.as_posix()


def lesion_record(plan: StudyPlan, lesion: Lesion, *, series_uid: str, sop_uid: str | None, grid: Grid | None,
                  voxel: tuple[float, float, float], mask: np.ndarray, mask_path: str) -> dict[str, Any]:
    """The ``lesions.json`` record of one lesion.

    Args:
        plan: The study.
        lesion: The lesion as drawn.
        series_uid: SeriesInstanceUID of the image it is in.
        sop_uid: SOPInstanceUID for a 2D image, None for a volume.
        grid: The volume's grid, or None for a 2D image (then no patient centre is recorded).
        voxel: Centre as ``(slice, row, column)``.
        mask: The lesion mask.
        mask_path: Where the mask was saved, relative to the site folder.

    Returns:
        The JSON-ready record.
    """
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


def volume_lesion_record(plan: StudyPlan, lesion: Lesion, *, grid: Grid, series_uid: str,
                         site_dir: Path) -> dict[str, Any]:
    """Save the mask of a lesion in a volume and return its ``lesions.json`` record.

    Args:
        plan: The study.
        lesion: The lesion as drawn on ``grid``.
        grid: The volume's grid.
        series_uid: SeriesInstanceUID of the volume (also the mask's file name).
        site_dir: The site's output folder.

    Returns:
        The JSON-ready record.
    """
    voxel = grid.voxel(lesion.centre)
    mask = mask_of(lesion.weight, voxel)
    rel = save_mask(site_dir, series_uid, mask=mask)
    return lesion_record(plan, lesion, series_uid=series_uid, sop_uid=None, grid=grid, voxel=voxel, mask=mask,
                         mask_path=rel)
