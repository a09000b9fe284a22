"""A synthetic consortium of hospitals: real DICOM studies for the cancer tasks, with known lesions.

Each site gets its own DICOM folder, a labels CSV and a record of every lesion (centre in patient
coordinates and voxel indices, radius, and a mask), so that models can be trained on it and saliency
maps checked against the truth. Sites differ the way hospitals do: scanner vendors and models, CT
slice thickness and rescale, MR gain, bias field and noise, mammography bit depth and photometric
interpretation, class balance, study counts, file naming and transfer syntax. One site writes its
MR as enhanced multi-frame objects, another plans them oblique.

Anatomy is drawn analytically in patient coordinates (LPS, mm) and sampled at each voxel centre, so
any slice thickness, pixel spacing or oblique plane gives a consistent image and an exact lesion mask.

The parts: :mod:`~imaging.synth.profiles` (how sites differ), :mod:`~imaging.synth.geometry` (grids and
shapes), :mod:`~imaging.synth.phantoms` (one phantom per task, keyed by preset name),
:mod:`~imaging.synth.modalities` (the CT, MR and MG scanners that turn a phantom into a series),
:mod:`~imaging.synth.dicom_writers` (DICOM modules and the fast series writer), :mod:`~imaging.synth.naming`
(file layouts), :mod:`~imaging.synth.study` (study plans and lesion records) and
:mod:`~imaging.synth.consortium` (sites, parallel generation, the manifest).

Usage::

    from imaging.synth import generate_consortium
    result = generate_consortium(Path("consortium"), sites=3, studies_per_task=24, seed=0)
"""

from __future__ import annotations

from imaging.synth.consortium import (
    FORMAT,
    MARKER,
    ConsortiumResult,
    Progress,
    SiteResult,
    generate_consortium,
    ingested_consortium,
    validate_tasks,
)
from imaging.synth.dicom_writers import CT_IMAGE, ENHANCED_MR_IMAGE, MG_FOR_PRESENTATION, MR_IMAGE
from imaging.synth.geometry import Grid, ellipsoid, paint, smooth_noise
from imaging.synth.modalities import CtPhantom, MgPhantom, MrPhantom, Phantom
from imaging.synth.phantoms import ALL_TASKS, PHANTOMS, phantom_for
from imaging.synth.profiles import SiteProfile, site_names, site_profiles
from imaging.synth.study import Lesion, Patient, StudyPlan

__all__ = [
    "ALL_TASKS",
    "CT_IMAGE",
    "ENHANCED_MR_IMAGE",
    "FORMAT",
    "MARKER",
    "MG_FOR_PRESENTATION",
    "MR_IMAGE",
    "PHANTOMS",
    "ConsortiumResult",
    "CtPhantom",
    "Grid",
    "Lesion",
    "MgPhantom",
    "MrPhantom",
    "Patient",
    "Phantom",
    "Progress",
    "SiteProfile",
    "SiteResult",
    "StudyPlan",
    "ellipsoid",
    "generate_consortium",
    "ingested_consortium",
    "paint",
    "phantom_for",
    "site_names",
    "site_profiles",
    "smooth_noise",
    "validate_tasks",
]
