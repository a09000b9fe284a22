"""DICOM writing for the synthetic studies: the shared header, pixel modules, a fast series writer, and the
modality modules (MR sequence, Enhanced MR functional groups, mammography view) the scanners fill in.

Nothing here knows a task; what a task's study says about its anatomy is passed in by its phantom.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from imaging.synth.geometry import Grid
from imaging.synth.profiles import SiteProfile
from imaging.synth.study import StudyPlan

__all__ = [
    "CT_IMAGE",
    "ENHANCED_MR_IMAGE",
    "MG_FOR_PRESENTATION",
    "MR_IMAGE",
    "VARYING",
    "SeriesWriter",
    "base_dataset",
    "code",
    "ct_storage",
    "enhanced_mr_frame",
    "enhanced_mr_modules",
    "mammography_tags",
    "mr_sequence_tags",
    "set_pixels_uint",
    "slice_values",
    "write_file",
    "write_series",
]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"

# The elements that differ between the files of a single-frame series: SOPInstanceUID, InstanceNumber,
# ImagePositionPatient, SliceLocation, PixelData.
VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def base_dataset(plan: StudyPlan, sop_class: str, *, modality: str, series_uid: str, series_number: int,
                 description: str, study_description: str) -> Dataset:
    """The patient, study, series and equipment modules every file of a study shares.

    Args:
        plan: The study.
        sop_class: SOPClassUID.
        modality: Modality (also picks the site's vendor).
        series_uid: SeriesInstanceUID.
        series_number: SeriesNumber.
        description: SeriesDescription.
        study_description: StudyDescription.

    Returns:
        A dataset with file meta information in the site's transfer syntax.
    """
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
    ds.StudyDescription = study_description
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


def set_pixels_uint(ds: Dataset, bits: int, *, signed: bool) -> None:
    """Set the image pixel module of 16-bit-allocated monochrome pixels.

    Args:
        ds: The dataset (modified).
        bits: BitsStored.
        signed: PixelRepresentation 1 (two's complement) or 0 (unsigned).
    """
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0


def ct_storage(site: SiteProfile) -> tuple[int, bool, float]:
    """How the site stores CT values.

    Args:
        site: The site's profile.

    Returns:
        ``(bits stored, signed, rescale intercept)``.
    """
    return {"int16": (16, True, 0.0), "uint12": (12, False, -1024.0), "uint16": (16, False, -8192.0)}[site.ct_storage]


def write_file(ds: Dataset, path: Path) -> int:
    """Write ``ds`` as a DICOM file at ``path`` (folders created).

    Args:
        ds: A dataset with file meta information.
        path: Where to write it.

    Returns:
        1, the number of files written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return 1


class SeriesWriter:
    """Writes the files of a single-frame series fast: the header they share is encoded once.

    The elements that differ per slice (``varying``) are encoded per file and spliced in tag order
    between the pre-encoded runs of shared elements; the result is byte-identical to ``save_as``.

    Args:
        template: The shared header, with file meta information.
        varying: Tags of the elements each file sets itself.
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
        """Write one file whose varying elements are taken from ``values``.

        Args:
            path: Where to write it (folders created).
            values: The varying elements (SOPInstanceUID among them).

        Returns:
            1, the number of files written.
        """
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


def slice_values(sop_uid: str, number: int, *, position: np.ndarray, location: float,
                 pixels: np.ndarray) -> Dataset:
    """The :data:`VARYING` elements of one slice.

    Args:
        sop_uid: SOPInstanceUID.
        number: InstanceNumber.
        position: ImagePositionPatient.
        location: SliceLocation.
        pixels: The stored 16-bit pixels of the slice.

    Returns:
        A dataset holding just those elements.
    """
    values = Dataset()
    values.SOPInstanceUID = sop_uid
    values.InstanceNumber = number
    values.ImagePositionPatient = [round(float(v), 4) for v in position]
    values.SliceLocation = round(location, 4)
    values.add_new(0x7FE00010, "OW", pixels.tobytes())
    return values


def write_series(template: Dataset, slices: list[tuple[Path, Dataset]]) -> int:
    """Write a single-frame series: the template's shared header plus each slice's values.

    Args:
        template: The shared header, with file meta information.
        slices: ``(path, values)`` per file, values from :func:`slice_values`.

    Returns:
        The number of files written.
    """
    writer = SeriesWriter(template, VARYING)
    return sum(writer.write(path, values) for path, values in slices)


def code(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item.

    Args:
        value: CodeValue.
        scheme: CodingSchemeDesignator.
        meaning: CodeMeaning.

    Returns:
        The item.
    """
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


def mr_sequence_tags(ds: Dataset, site: SiteProfile) -> None:
    """Set the MR image module's sequence attributes of a T2-weighted turbo spin echo.

    Args:
        ds: The dataset (modified).
        site: The site's profile (field strength).
    """
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


def enhanced_mr_modules(ds: Dataset, site: SiteProfile, *, grid: Grid, orientation: list[float],
                        frame_of_reference: str, plan: StudyPlan, body_part: str, region: Dataset) -> None:
    """Set the modules of an Enhanced MR Image object of a T2-weighted TSE (shared functional groups included).

    Args:
        ds: The dataset (modified).
        site: The site's profile.
        grid: The volume's grid.
        orientation: ImageOrientationPatient.
        frame_of_reference: FrameOfReferenceUID.
        plan: The study.
        body_part: BodyPartExamined.
        region: The anatomic region code of the frames (from :func:`code`).
    """
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
    ds.BodyPartExamined = body_part
    ds.PatientPosition = "FFS"
    ds.Rows, ds.Columns = rows, cols
    set_pixels_uint(ds, 12, signed=False)
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
        FrameAnatomySequence=_seq(_item(FrameLaterality="U", AnatomicRegionSequence=_seq(region))),
        PixelValueTransformationSequence=_seq(_item(RescaleIntercept=0.0, RescaleSlope=1.0, RescaleType="US")),
        MRImageFrameTypeSequence=_seq(_item(FrameType=["ORIGINAL", "PRIMARY", "M", "NONE"],
                                            PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
                                            VolumeBasedCalculationTechnique="NONE",
                                            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T2")),
    )
    ds.SharedFunctionalGroupsSequence = _seq(shared)


def enhanced_mr_frame(grid: Grid, k: int, plan: StudyPlan) -> Dataset:
    """The per-frame functional groups of slice ``k`` of an Enhanced MR Image.

    Args:
        grid: The volume's grid.
        k: The slice index on ``grid``.
        plan: The study.

    Returns:
        One item of PerFrameFunctionalGroupsSequence.
    """
    return _item(
        FrameContentSequence=_seq(_item(
            FrameAcquisitionNumber=1, FrameReferenceDateTime=plan.date + plan.time,
            FrameAcquisitionDateTime=plan.date + plan.time, FrameAcquisitionDuration=180.0,
            StackID="1", InStackPositionNumber=k + 1, DimensionIndexValues=[k + 1])),
        PlanePositionSequence=_seq(_item(ImagePositionPatient=[round(float(v), 4) for v in grid.position(k)])),
    )


def mammography_tags(ds: Dataset, site: SiteProfile, *, laterality: str, view: str, spacing: float, rows: int,
                     cols: int, rng: np.random.Generator) -> None:
    """Set the mammography image, positioner and pixel modules of one view.

    Args:
        ds: The dataset (modified).
        site: The site's profile (bit depth, photometric interpretation).
        laterality: ``"R"`` or ``"L"``.
        view: ``"CC"`` or ``"MLO"``.
        spacing: ImagerPixelSpacing in mm.
        rows: Rows.
        cols: Columns.
        rng: Draws the exposure parameters.
    """
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
    ds.AnatomicRegionSequence = _seq(code("76752008", "SCT", "Breast"))
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
    set_pixels_uint(ds, site.mg_bits, signed=False)
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
