"""Read what the node needs from a received instance's header, without pixel data.

Tolerant on reading (STYLE.md): any transfer syntax pydicom can parse, missing optional
attributes become None. Patient identifiers are read only to be pseudonymised.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from sijnode.errors import InvalidInstanceError
from sijnode.uids import is_valid_uid

# What pydicom raises on a damaged or cut-short instance (zlib.error: a deflated data set
# whose stream ends early, e.g. only the head of a large instance).
READ_ERRORS = (
    InvalidDicomError,
    EOFError,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    zlib.error,
)


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the daemon records, routes and assembles studies by."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    manufacturer: str | None
    manufacturer_model_name: str | None
    station_name: str | None
    image_type: str | None
    instance_number: int | None
    images_in_acquisition: int | None
    series_related_instances: int | None
    slice_position: float | None
    orientation: str | None
    study_date: str | None
    patient_id: str | None
    accession_number: str | None


def _str(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def geometry(
    orientation: list[float] | None, position: list[float] | None
) -> tuple[float | None, str | None]:
    """Position along the slice normal (PS3.3 C.7.6.2.1.1) and the plane's name.

    Plain arithmetic on the two direction cosines: this runs for every received instance.
    """
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None, None
    rx, ry, rz, cx, cy, cz = orientation
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    along = normal[0] * position[0] + normal[1] * position[1] + normal[2] * position[2]
    sizes = [abs(v) for v in normal]
    axis = sizes.index(max(sizes))
    name = ("sagittal", "coronal", "axial")[axis]
    if sizes[axis] < 0.95:
        name = "oblique-" + name
    return float(along), name


def slice_geometry(ds: Dataset) -> tuple[float | None, str | None]:
    """:func:`geometry` of a data set's ImageOrientation/PositionPatient."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ipp = [float(v) for v in ds.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        return None, None
    return geometry(iop, ipp)


def read_header(data: bytes) -> InstanceHeader:
    """Parse the header of an encoded instance (with file meta); raise on garbage."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except READ_ERRORS as exc:
        raise InvalidInstanceError(f"not a readable DICOM instance: {exc}") from exc
    try:
        study = str(ds.StudyInstanceUID)
        series = str(ds.SeriesInstanceUID)
        sop = str(ds.SOPInstanceUID)
        sop_class = str(ds.SOPClassUID)
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        raise InvalidInstanceError(f"instance lacks a required UID: {exc}") from exc
    for name, uid in (
        ("StudyInstanceUID", study),
        ("SeriesInstanceUID", series),
        ("SOPInstanceUID", sop),
        ("SOPClassUID", sop_class),
    ):
        if not is_valid_uid(uid):
            raise InvalidInstanceError(f"{name} is not a valid UID (PS3.5 §9.1): {uid!r}")
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    try:
        position, orientation = slice_geometry(ds)
    except (ValueError, TypeError, KeyError):
        position, orientation = None, None
    return InstanceHeader(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        transfer_syntax_uid=tsyntax,
        modality=_str(ds, "Modality"),
        body_part_examined=_str(ds, "BodyPartExamined"),
        series_description=_str(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        manufacturer=_str(ds, "Manufacturer"),
        manufacturer_model_name=_str(ds, "ManufacturerModelName"),
        station_name=_str(ds, "StationName"),
        image_type=_str(ds, "ImageType"),
        instance_number=_int(ds, "InstanceNumber"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        series_related_instances=_int(ds, "NumberOfSeriesRelatedInstances"),
        slice_position=position,
        orientation=orientation,
        study_date=_str(ds, "StudyDate"),
        patient_id=_str(ds, "PatientID"),
        accession_number=_str(ds, "AccessionNumber"),
    )
