"""How a phantom becomes a study: one scanner per modality (CT, MR, MG) acquires the anatomy a task's phantom
draws, adds the site's noise and storage quirks, and writes the DICOM series and the lesion truth.

A task's phantom is one of :class:`CtPhantom`, :class:`MrPhantom` or :class:`MgPhantom`, filled in with
its drawing function and the words its study uses; see :mod:`imaging.synth.phantoms`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from imaging.synth.dicom_writers import (
    CT_IMAGE,
    ENHANCED_MR_IMAGE,
    MG_FOR_PRESENTATION,
    MR_IMAGE,
    base_dataset,
    code,
    ct_storage,
    enhanced_mr_frame,
    enhanced_mr_modules,
    mammography_tags,
    mr_sequence_tags,
    set_pixels_uint,
    slice_values,
    write_file,
    write_series,
)
from imaging.synth.geometry import Grid, smooth_noise
from imaging.synth.naming import Namer
from imaging.synth.segmentation import slice_source, write_segmentation
from imaging.synth.study import Lesion, StudyPlan, lesion_record, mask_of, save_mask, volume_lesion_record

__all__ = [
    "CtDraw",
    "CtPhantom",
    "MgAnatomy",
    "MgPhantom",
    "MrDraw",
    "MrPhantom",
    "Phantom",
    "Projection",
    "Written",
]

Written = tuple[int, list[dict[str, Any]]]
"""What writing a study gives: the number of files, and one ``lesions.json`` record per lesion."""

CtDraw = Callable[[np.random.Generator, Grid, int, float], tuple[np.ndarray, Lesion | None]]
"""``draw(rng, grid, label, body) -> (HU on grid, lesion or None)``; ``body`` is the patient's size factor."""

MrDraw = Callable[[np.random.Generator, Grid, int, float, np.ndarray], tuple[np.ndarray, Lesion | None]]
"""``draw(rng, grid, label, body, organ_centre) -> (signal on grid, lesion or None)``; signal: fat about 1000."""


class Phantom(Protocol):
    """What the generator needs of a task's phantom."""

    @property
    def task(self) -> str:
        """The task (a name in :data:`imaging.presets.PRESETS`)."""
        ...

    @property
    def modality(self) -> str:
        """The DICOM Modality its studies have (the preset's)."""
        ...

    @property
    def patient_sex(self) -> str | None:
        """``"F"`` or ``"M"`` if only patients of that sex have this study, else None."""
        ...

    def write(self, plan: StudyPlan, rng: np.random.Generator, *, site_dir: Path, namer: Namer,
              scale: int, annotations: Namer | None = None) -> Written:
        """Draw, scan and write one study.

        Args:
            plan: The study.
            rng: Its random source (seeded from ``plan.seed``).
            site_dir: The site's output folder (lesion masks go under it).
            namer: The site's file names.
            scale: In-plane matrix multiplier.
            annotations: The site's names for the lesion SEG objects (one per image with a lesion); None writes
                none.

        Returns:
            The number of files written and the study's lesion records.
        """
        ...


@dataclass(frozen=True)
class CtPhantom:
    """A CT task: anatomy drawn in Hounsfield units on an axial grid, stored as the site's CT scanner does.

    Args:
        task: The task (a preset name).
        study_description: StudyDescription.
        series_description: SeriesDescription; ``{thickness}`` is replaced by the slice thickness in mm.
        body_part: BodyPartExamined (one site leaves it out).
        window: ``(WindowCenter, WindowWidth)``.
        centre_z_mm: Range of the patient Z (mm) of the scan's centre.
        draw: Draws the anatomy and, for a positive study, the lesion.
        patient_sex: Restricts the study to patients of one sex (None: either).
    """

    modality: ClassVar[str] = "CT"

    task: str
    study_description: str
    series_description: str
    body_part: str
    window: tuple[int, int]
    centre_z_mm: tuple[float, float]
    draw: CtDraw
    patient_sex: str | None = None

    def write(self, plan: StudyPlan, rng: np.random.Generator, *, site_dir: Path, namer: Namer,
              scale: int, annotations: Namer | None = None) -> Written:
        """Draw, scan and write one CT series and its lesion's SEG (see :meth:`Phantom.write`)."""
        site = plan.site
        cols = rows = 64 * scale
        pixel = site.ct_pixel * rng.uniform(0.97, 1.03) / scale
        n = int(round(160.0 / site.ct_thickness))
        table = rng.uniform(-15, 15)
        centre = (rng.uniform(-5, 5), table, rng.uniform(*self.centre_z_mm))
        grid = Grid.centred(centre, (n, rows, cols), (site.ct_thickness, pixel, pixel))
        hu, lesion = self.draw(rng, grid, plan.label, plan.patient.body)
        noise = smooth_noise(rng, grid.shape, (0.3, 0.7, 0.7)) * site.ct_noise_hu
        hu = hu + noise + site.ct_offset_hu
        yy, xx = np.mgrid[:rows, :cols]
        fov = ((yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2) > (rows / 2) ** 2
        hu[:, fov] = -1024.0  # outside the reconstruction circle
        bits, signed, intercept = ct_storage(site)
        stored = np.rint(hu - intercept)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        stored = np.clip(stored, lo, hi).astype(np.int16 if signed else np.uint16)

        series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "2"])
        desc = self.series_description.format(thickness=site.ct_thickness)
        ds = base_dataset(plan, CT_IMAGE, modality="CT", series_uid=series_uid, series_number=2, description=desc,
                          study_description=self.study_description)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if site.name != "site-c":  # one site leaves this optional tag out, as some scanners do
            ds.BodyPartExamined = self.body_part
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
        set_pixels_uint(ds, bits, signed=signed)
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = self.window
        folder = namer.series_dir(plan, 2, description=desc)
        slices = []
        for k in range(n):
            pos = grid.position(k)
            number = (n - k) if site.ct_descending else (k + 1)
            slices.append((namer.file(folder, number), slice_values(
                generate_uid(entropy_srcs=[series_uid, str(k)]), number, position=pos, location=float(pos[2]),
                pixels=stored[k])))
        write_series(ds, slices)
        records = []
        if lesion is not None:
            records.append(volume_lesion_record(plan, lesion, grid=grid, series_uid=series_uid, site_dir=site_dir))
            if annotations is not None:  # the slices are in the grid's (the reader's) order, as the mask is
                n += write_segmentation(plan, [slice_source(ds, values) for _, values in slices],
                                        mask_of(lesion.weight, grid.voxel(lesion.centre)), image_key=series_uid,
                                        instance_number=1, namer=annotations)
        return n, records


@dataclass(frozen=True)
class MrPhantom:
    """An MR task: T2-weighted signal drawn on an axial or oblique grid around an organ, with Rician noise,
    stored as classic single-frame images or one enhanced multi-frame object (the site decides).

    Args:
        task: The task (a preset name).
        study_description: StudyDescription.
        body_part: BodyPartExamined.
        region: The anatomic region ``(CodeValue, CodingSchemeDesignator, CodeMeaning)`` of enhanced MR frames.
        organ_mm: Ranges of the organ centre's patient X, Y and Z (mm); the field of view is centred near it.
        draw: Draws the anatomy around the organ centre and, for a positive study, the lesion.
        patient_sex: Restricts the study to patients of one sex (None: either).
    """

    modality: ClassVar[str] = "MR"

    task: str
    study_description: str
    body_part: str
    region: tuple[str, str, str]
    organ_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    draw: MrDraw
    patient_sex: str | None = None

    def write(self, plan: StudyPlan, rng: np.random.Generator, *, site_dir: Path, namer: Namer,
              scale: int, annotations: Namer | None = None) -> Written:
        """Draw, scan and write one T2-weighted MR series and its lesion's SEG (see :meth:`Phantom.write`)."""
        site = plan.site
        rows = cols = 64 * scale
        pixel = rng.uniform(2.8, 3.1) / scale
        n = int(rng.integers(20, 25))
        thickness = 3.5 if site.mr_field < 3 else 3.0
        organ = np.array([rng.uniform(*bounds) for bounds in self.organ_mm])
        centre = organ + np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(-5, 5)])
        grid = Grid.centred(centre, (n, rows, cols), (thickness, pixel, pixel), site.mr_oblique_deg)
        signal, lesion = self.draw(rng, grid, plan.label, plan.patient.body, organ)
        sigma = site.mr_noise * 1000.0
        signal = np.sqrt((signal + sigma * rng.standard_normal(signal.shape)) ** 2
                         + (sigma * rng.standard_normal(signal.shape)) ** 2)  # Rician magnitude noise
        stored = np.clip(np.rint(signal * site.mr_gain * rng.uniform(0.9, 1.1)), 0, 4095).astype(np.uint16)

        series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "5"])
        desc = "t2_tse_tra" if site.mr_oblique_deg == 0 else "T2 FSE OBL AX"
        folder = namer.series_dir(plan, 5, description=desc)
        frame_of_reference = generate_uid(entropy_srcs=[plan.study_uid, "for"])
        orientation = [round(float(v), 6) for v in (*grid.row_dir, *grid.col_dir)]
        files = 0
        if site.mr_enhanced:
            ds = base_dataset(plan, ENHANCED_MR_IMAGE, modality="MR", series_uid=series_uid, series_number=5,
                              description=desc, study_description=self.study_description)
            enhanced_mr_modules(ds, site, grid=grid, orientation=orientation, frame_of_reference=frame_of_reference,
                                plan=plan, body_part=self.body_part, region=code(*self.region))
            order = np.arange(n)[::-1]  # frames stored head to feet
            ds.NumberOfFrames = n
            ds.PerFrameFunctionalGroupsSequence = DicomSequence([enhanced_mr_frame(grid, int(k), plan) for k in order])
            ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "enhanced"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = 1
            files += write_file(ds, namer.file(folder, 1))
            sources = [ds]
        else:
            ds = base_dataset(plan, MR_IMAGE, modality="MR", series_uid=series_uid, series_number=5,
                              description=desc, study_description=self.study_description)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
            ds.BodyPartExamined = self.body_part
            ds.PatientPosition = "FFS"
            ds.FrameOfReferenceUID = frame_of_reference
            ds.PositionReferenceIndicator = ""
            mr_sequence_tags(ds, site)
            ds.SliceThickness = thickness
            ds.SpacingBetweenSlices = thickness
            ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
            ds.ImageOrientationPatient = orientation
            ds.Rows, ds.Columns = rows, cols
            set_pixels_uint(ds, 12, signed=False)
            ds.WindowCenter, ds.WindowWidth = int(700 * site.mr_gain), int(1400 * site.mr_gain)
            slices = []
            for k in range(n):
                pos = grid.position(k)
                slices.append((namer.file(folder, k + 1), slice_values(
                    generate_uid(entropy_srcs=[series_uid, str(k)]), k + 1, position=pos,
                    location=float(pos @ grid.normal), pixels=stored[k])))
            files += write_series(ds, slices)
            order = np.arange(n)
            sources = [slice_source(ds, values) for _, values in slices]
        records = []
        if lesion is not None:
            records.append(volume_lesion_record(plan, lesion, grid=grid, series_uid=series_uid, site_dir=site_dir))
            if annotations is not None:  # one SEG frame per source frame, in the order the source stores them
                files += write_segmentation(plan, sources, mask_of(lesion.weight, grid.voxel(lesion.centre))[order],
                                            image_key=series_uid, instance_number=1, namer=annotations)
        return files, records


@dataclass(frozen=True)
class Projection:
    """One projection image as drawn, before the detector.

    Args:
        image: Intensities in [0, 1] (1 = densest), ``(rows, cols)``.
        lesion_weight: The lesion's partial-volume weight, or None without a lesion.
        lesion_centre: The lesion's centre ``(row, col)``, or None.
        lesion_radius_mm: The lesion's radius (0 without one).
    """

    image: np.ndarray
    lesion_weight: np.ndarray | None
    lesion_centre: tuple[float, float] | None
    lesion_radius_mm: float


class MgAnatomy(Protocol):
    """One patient's breast as an :class:`MgPhantom` samples it: drawn once per study, imaged once per view."""

    @property
    def kind(self) -> str:
        """What its lesion is (recorded as the lesion's kind)."""
        ...

    def image(self, rng: np.random.Generator, view: str, *, rows: int, cols: int, spacing: float,
              label: int) -> Projection:
        """A right breast seen in ``view`` (``"CC"`` or ``"MLO"``), chest wall at the right edge.

        Args:
            rng: The study's random source.
            view: The view position.
            rows: Image rows.
            cols: Image columns.
            spacing: Pixel spacing in mm.
            label: 1 to show the lesion.

        Returns:
            The projection.
        """
        ...


@dataclass(frozen=True)
class MgPhantom:
    """A mammography task: CC and MLO views of one side, stored as the site's detector does (bit depth,
    gamma, MONOCHROME1, JPEG 2000 or RLE).

    Args:
        task: The task (a preset name).
        study_description: StudyDescription.
        sample: Draws one patient's anatomy (once per study, after the side is chosen).
        patient_sex: Restricts the study to patients of one sex (None: either).
    """

    modality: ClassVar[str] = "MG"

    task: str
    study_description: str
    sample: Callable[[np.random.Generator], MgAnatomy]
    patient_sex: str | None = None

    def write(self, plan: StudyPlan, rng: np.random.Generator, *, site_dir: Path, namer: Namer,
              scale: int, annotations: Namer | None = None) -> Written:
        """Draw, expose and write the two views of one side and a SEG per view with a lesion (see
        :meth:`Phantom.write`)."""
        site = plan.site
        rows, cols = 160 * scale, 128 * scale
        spacing = rng.uniform(0.78, 0.82) / scale
        laterality = "R" if rng.random() < 0.5 else "L"
        anatomy = self.sample(rng)
        series_uid = generate_uid(entropy_srcs=[plan.study_uid, "series", "1"])
        files, records = 0, []
        max_value = 2**site.mg_bits - 1
        for number, view in enumerate(("CC", "MLO"), start=1):
            drawn = anatomy.image(rng, view, rows=rows, cols=cols, spacing=spacing, label=plan.label)
            weight, centre = drawn.lesion_weight, drawn.lesion_centre
            img = drawn.image + 0.01 * rng.standard_normal(drawn.image.shape).astype(np.float32)
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
            ds = base_dataset(plan, MG_FOR_PRESENTATION, modality="MG", series_uid=series_uid, series_number=1,
                              description=desc, study_description=self.study_description)
            mammography_tags(ds, site, laterality=laterality, view=view, spacing=spacing, rows=rows, cols=cols,
                             rng=rng)
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
            files += write_file(ds, namer.file(namer.series_dir(plan, 1, description="MG"), number))
            if weight is not None and centre is not None:
                voxel = (centre[0], centre[1])
                mask = mask_of(np.ascontiguousarray(weight), voxel)
                rel = save_mask(site_dir, sop, mask=mask)
                lesion = Lesion(np.array([np.nan] * 3), drawn.lesion_radius_mm, anatomy.kind, weight)
                record = lesion_record(plan, lesion, series_uid=series_uid, sop_uid=sop, grid=None,
                                       voxel=(0.0, *voxel), mask=mask, mask_path=rel)
                record["laterality"], record["view"] = laterality, view
                records.append(record)
                if annotations is not None:
                    files += write_segmentation(plan, [ds], mask[None], image_key=sop, instance_number=number,
                                                namer=annotations)
        return files, records
