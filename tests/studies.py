"""Small DICOM studies for listener tests, made in-process (deterministic by seed).

The realistic phantoms live in ``sijnode.synth``; these are tiny images so that protocol
tests run fast, with every attribute the node assembles and routes by.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from sijnode.uids import DEFAULT_UID_ROOT, make_uid

PATIENT_NAME = "TESTPATIENT^SECRET"
PATIENT_ID = "PID-SECRET-4711"
ACCESSION = "ACC-SECRET-0815"


def make_series(
    seed: str,
    study_uid: str,
    series_number: int,
    n: int,
    modality: str = "CT",
    rows: int = 32,
    images_in_acquisition: int | None = -1,
    instance_numbers: list[int] | None = None,
) -> list[Dataset]:
    """``n`` slices of one axial series; ``images_in_acquisition=-1`` means ``n``."""
    series_uid = make_uid(DEFAULT_UID_ROOT, [seed, study_uid, str(series_number)])
    frame_uid = make_uid(DEFAULT_UID_ROOT, [seed, study_uid, "frame"])
    rng = np.random.default_rng(zlib.crc32(f"{seed}:{series_number}".encode()))
    out = []
    numbers = instance_numbers or list(range(1, n + 1))
    for number in numbers:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = make_uid(DEFAULT_UID_ROOT, [series_uid, str(number)])
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.AccessionNumber = ACCESSION
        ds.PatientBirthDate = "19700101"
        ds.StudyDate = "20260101"
        ds.Modality = modality
        ds.BodyPartExamined = "PELVIS"
        ds.SeriesDescription = f"test series {series_number}"
        ds.SeriesNumber = series_number
        ds.Manufacturer = "sijnode-tests"
        ds.ManufacturerModelName = "tiny"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = number
        if images_in_acquisition is not None:
            ds.ImagesInAcquisition = n if images_in_acquisition == -1 else images_in_acquisition
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(number) * 2.0]
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = 2
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = rng.integers(0, 2000, (rows, rows), dtype=np.int16).tobytes()
        out.append(ds)
    return out


def make_study(seed: str, series: int = 1, n: int = 4, modality: str = "CT") -> list[Dataset]:
    """A study of ``series`` series with ``n`` slices each."""
    study_uid = make_uid(DEFAULT_UID_ROOT, [seed, "study"])
    out: list[Dataset] = []
    for number in range(1, series + 1):
        out.extend(make_series(seed, study_uid, number, n, modality))
    return out


PRIVATE_NON_IMAGE = "1.3.12.2.1107.5.9.1"  # Siemens CSA Non-Image Storage


def private_non_image(study_uid: str, seed: str = "csa") -> Dataset:
    """A private non-image object as Siemens scanners add to MR studies."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = PRIVATE_NON_IMAGE
    ds.SOPInstanceUID = make_uid(DEFAULT_UID_ROOT, [seed, study_uid, "csa"])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = make_uid(DEFAULT_UID_ROOT, [seed, study_uid, "csa-series"])
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.StudyDate = "20260101"
    ds.Modality = "MR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.SeriesDescription = "PhoenixZIPReport"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.add_new(0x00290010, "LO", "SIEMENS CSA NON-IMAGE")
    ds.add_new(0x00291010, "OB", b"\x00" * 512)
    return ds


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (what the node spools)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Write each dataset to ``folder`` as NNNN.dcm."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_part(data: bytes) -> bytes:
    """The bytes after the preamble and file meta: what travelled in the P-DATA PDUs."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(data)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return data[fh.tell() :]
