"""Plain pydicom datasets for the synthetic source images.

Modules follow PS3.3 A.3 (CT Image IOD) and A.4 (MR Image IOD): Patient, General Study,
Patient Study, General Series, Frame of Reference, General Equipment, General
Acquisition, General Image, Image Plane, Image Pixel, Contrast/Bolus (MR), CT Image or
MR Image, VOI LUT and SOP Common. Every UID is derived from the seed and the subject under
the node's root, and every date and time is fixed, so one seed gives identical bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from sijnode import __version__
from sijnode.errors import SynthesisError
from sijnode.synth.truth import Modality
from sijnode.uids import is_valid_uid, make_uid

MANUFACTURER = "sijnode-synth"
#: Day 0 of the synthetic calendar; subject ``n`` is scanned ``n`` days later.
BASE_DATE = date(2024, 1, 1)


def ds_str(value: float) -> str:
    """A Decimal String (PS3.5 §6.2: at most 16 characters) without exponent."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        text = f"{value:.8g}"
    return text


def synth_uid(root: str, seed: int, subject_index: int, *parts: str) -> UID:
    """A UID under ``root``, a pure function of the seed, subject and ``parts``."""
    uid = make_uid(root, ["sijnode-synth", f"seed={seed}", f"subject={subject_index}", *parts])
    if not is_valid_uid(uid):
        raise SynthesisError(f"expected a valid UID under root {root!r}, got {uid!r}")
    return uid


@dataclass(frozen=True)
class Patient:
    """A synthetic patient; the identifiers are obviously fake and searchable in tests."""

    subject_index: int
    seed: int
    subject_id: str
    name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    weight_kg: float


def make_patient(seed: int, subject_index: int, rng: np.random.Generator) -> Patient:
    """Adults only (Fu et al. 2024, Methods); ages 18-59 as in Lee et al. 2021 §2.1."""
    age = int(rng.integers(18, 60))
    scan_day = BASE_DATE + timedelta(days=subject_index)
    birth = date(scan_day.year - age, 1 + int(rng.integers(0, 12)), 1 + int(rng.integers(0, 28)))
    if (birth.month, birth.day) > (scan_day.month, scan_day.day):  # no birthday yet
        age -= 1
    return Patient(
        subject_index=subject_index,
        seed=seed,
        subject_id=f"sub-{subject_index:04d}",
        name=f"SYNTH^SUBJECT{subject_index:03d}",
        patient_id=f"SYNTH-{subject_index:04d}-{seed}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["M", "F"])),
        age=f"{age:03d}Y",
        weight_kg=float(round(rng.uniform(55, 100), 1)),
    )


@dataclass(frozen=True)
class SeriesPlan:
    """Everything one series shares; ``attributes`` holds the modality's own module."""

    modality: Modality
    uid_root: str
    rows: int
    columns: int
    pixel_spacing: float
    slice_thickness: float
    orientation: tuple[float, ...]
    n_slices: int
    study_time: str
    study_description: str
    series_description: str
    body_part: str
    series_number: int
    window_center: tuple[float, ...]
    window_width: tuple[float, ...]
    window_explanation: tuple[str, ...]
    pixel_signed: bool
    bits_stored: int
    attributes: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class SeriesUIDs:
    """The UIDs that all slices of one series share."""

    study: UID
    series: UID
    frame_of_reference: UID
    implementation: UID


def series_uids(root: str, seed: int, subject_index: int, modality: Modality) -> SeriesUIDs:
    """Study, series and frame-of-reference UIDs of one subject's study of ``modality``."""
    return SeriesUIDs(
        study=synth_uid(root, seed, subject_index, modality, "study"),
        series=synth_uid(root, seed, subject_index, modality, "series"),
        frame_of_reference=synth_uid(root, seed, subject_index, modality, "frame"),
        implementation=make_uid(root, ["sijnode-synth", "implementation"]),
    )


def sop_instance_uid(root: str, seed: int, subject_index: int, modality: Modality, n: int) -> UID:
    """SOPInstanceUID of slice ``n`` (InstanceNumber) of one subject's study."""
    return synth_uid(root, seed, subject_index, modality, f"instance={n}")


class SeriesBuilder:
    """Builds the slices of one series from a template holding everything they share."""

    def __init__(self, patient: Patient, plan: SeriesPlan, uids: SeriesUIDs) -> None:
        self.patient, self.plan, self.uids = patient, plan, uids
        self.template = _template(patient, plan, uids)
        self.normal = np.cross(plan.orientation[:3], plan.orientation[3:])

    def slice(self, number: int, position: Sequence[float], pixels: np.ndarray) -> Dataset:
        """Slice ``number`` (its InstanceNumber, 1..N) whose first pixel is at ``position``."""
        plan = self.plan
        expected = np.int16 if plan.pixel_signed else np.uint16
        if pixels.shape != (plan.rows, plan.columns) or pixels.dtype != expected:
            raise SynthesisError(
                f"expected {plan.rows}x{plan.columns} {np.dtype(expected)} pixels, "
                f"got {pixels.shape} {pixels.dtype}"
            )
        if not 1 <= number <= plan.n_slices:
            raise SynthesisError(f"expected InstanceNumber 1 to {plan.n_slices}, got {number}")
        sop_uid = sop_instance_uid(
            plan.uid_root, self.patient.seed, self.patient.subject_index, plan.modality, number
        )
        ds = copy.deepcopy(self.template)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [ds_str(float(p)) for p in position]
        ds.SliceLocation = ds_str(float(np.dot(self.normal, position)))
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
        return ds


def _template(patient: Patient, plan: SeriesPlan, uids: SeriesUIDs) -> Dataset:
    """Every attribute the slices of one series share."""
    modality = plan.modality
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    day = (BASE_DATE + timedelta(days=patient.subject_index)).strftime("%Y%m%d")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = uids.implementation
    meta.ImplementationVersionName = f"SIJNODE_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY", "OTHER"]
    )
    ds.InstanceCreationDate = day
    ds.InstanceCreationTime = plan.study_time
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = day
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = plan.study_time
    ds.AccessionNumber = f"SYN{patient.subject_index:05d}{modality}"
    ds.Modality = modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "sijnode synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH"
    ds.StudyDescription = plan.study_description
    ds.SeriesDescription = plan.series_description
    ds.ManufacturerModelName = "phantom"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age
    ds.PatientWeight = ds_str(patient.weight_kg)
    ds.PatientIdentityRemoved = "NO"
    ds.BodyPartExamined = plan.body_part
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = f"sijnode {__version__}"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids.study
    ds.SeriesInstanceUID = uids.series
    ds.StudyID = f"S{patient.subject_index:04d}"
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [ds_str(c) for c in plan.orientation]
    ds.FrameOfReferenceUID = uids.frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.ImagesInAcquisition = plan.n_slices
    ds.SliceThickness = ds_str(plan.slice_thickness)
    ds.PixelSpacing = [ds_str(plan.pixel_spacing), ds_str(plan.pixel_spacing)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = plan.rows
    ds.Columns = plan.columns
    ds.BitsAllocated = 16
    ds.BitsStored = plan.bits_stored
    ds.HighBit = plan.bits_stored - 1
    ds.PixelRepresentation = 1 if plan.pixel_signed else 0
    ds.BurnedInAnnotation = "NO"
    ds.WindowCenter = [ds_str(c) for c in plan.window_center]
    ds.WindowWidth = [ds_str(w) for w in plan.window_width]
    ds.WindowCenterWidthExplanation = list(plan.window_explanation)
    for keyword, value in plan.attributes:
        setattr(ds, keyword, value)
    return ds
