"""The lesion of a synthetic image as a DICOM Segmentation object (highdicom), next to the study it marks.

One SEG per image with a lesion: BINARY, one segment ``lesion`` (category Morphologically Altered Structure,
type Neoplasm, drawn MANUAL-ly as far as a reader is concerned), referencing every source slice of the volume or
the one mammogram. Its mask is the one saved under ``masks/``, voxel for voxel. UIDs, dates and times follow
from the source's, so the same seed gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from imaging.synth.naming import Namer
from imaging.synth.study import StudyPlan

__all__ = ["SEG_DESCRIPTION", "SEG_SERIES_NUMBER", "lesion_segmentation", "slice_source", "write_segmentation"]

SEG_SERIES_NUMBER = 300
SEG_DESCRIPTION = "Lesion segmentation"

_CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")
_TYPE = ("108369006", "SCT", "Neoplasm")


def slice_source(template: Dataset, values: Dataset) -> Dataset:
    """The header of one slice of a single-frame series (no pixel data), as highdicom needs a source image.

    Args:
        template: The series' shared header (with file meta information).
        values: The slice's varying elements (from :func:`imaging.synth.dicom_writers.slice_values`).

    Returns:
        A dataset sharing the template's elements, with the slice's own added (pixel data left out).
    """
    ds = Dataset()
    ds.file_meta = template.file_meta
    for elem in template:
        ds.add(elem)
    for elem in values:
        if elem.tag != 0x7FE00010:
            ds.add(elem)
    return ds


def _uid(*parts: str) -> str:
    return str(generate_uid(entropy_srcs=["oncofed-synth-seg", *parts]))


def lesion_segmentation(plan: StudyPlan, sources: Sequence[Dataset], mask: np.ndarray, *, image_key: str,
                        instance_number: int) -> Dataset:
    """The SEG of one image's lesion mask.

    Args:
        plan: The study.
        sources: The image's source datasets: every slice of a single-frame series, or the one multi-frame or
            2D object.
        mask: Boolean, one frame per source slice in the order of ``sources`` (per frame of a multi-frame
            object, in its frame order): ``(frames, rows, cols)``.
        image_key: The image's catalog key (series UID of a volume, SOP instance UID of a 2D image); the SEG's
            UIDs follow from it.
        instance_number: InstanceNumber within the study's SEG series.

    Returns:
        The Segmentation dataset.
    """
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=hd.sr.CodedConcept(*_CATEGORY),
        segmented_property_type=hd.sr.CodedConcept(*_TYPE),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=_uid(image_key, "tracking"), tracking_id=f"lesion of {plan.task} study {plan.index + 1}",
    )
    seg = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=np.asarray(mask, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=_uid(plan.study_uid, "series"), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(image_key, "sop"), instance_number=instance_number,
        manufacturer="oncofed", manufacturer_model_name="oncofed-synth", software_versions="oncofed-synth 1",
        device_serial_number="1", content_label="LESION", content_description="Lesion drawn by the phantom",
        content_creator_name="SYNTHETIC^READER", content_date=plan.date, content_time=plan.time,
        series_date=plan.date, series_time=plan.time, series_description=SEG_DESCRIPTION,
    )
    # highdicom stamps the time of writing and a random UID; the same seed must give the same bytes.
    seg.InstanceCreationDate, seg.InstanceCreationTime = plan.date, plan.time
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = plan.date + plan.time
    dimension_uid = _uid(image_key, "dimension")
    for seq in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(seq, []):
            item.DimensionOrganizationUID = dimension_uid
    if "PatientOrientation" in sources[0] and "ImageOrientationPatient" not in sources[0]:
        seg.PatientOrientation = sources[0].PatientOrientation  # a projection image: its orientation in words
    return seg


def write_segmentation(plan: StudyPlan, sources: Sequence[Dataset], mask: np.ndarray, *, image_key: str,
                       instance_number: int, namer: Namer) -> int:
    """Write :func:`lesion_segmentation` into the study's SEG series folder, in the site's naming style.

    Args:
        plan: The study.
        sources: The image's source datasets (see :func:`lesion_segmentation`).
        mask: The lesion mask per source frame.
        image_key: The image's catalog key.
        instance_number: InstanceNumber within the study's SEG series.
        namer: The site's names for derived objects.

    Returns:
        1, the number of files written.
    """
    seg = lesion_segmentation(plan, sources, mask, image_key=image_key, instance_number=instance_number)
    path: Path = namer.file(namer.series_dir(plan, SEG_SERIES_NUMBER, description=SEG_DESCRIPTION), instance_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return 1
