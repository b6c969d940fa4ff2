"""Read what the node needs from a received instance's header, without pixel data.

Tolerant on reading (STYLE.md): any transfer syntax pydicom can parse, missing optional
attributes become None. Patient identifiers are read only to be pseudonymised.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.multival import MultiValue

from sijnode.errors import InvalidInstanceError
from sijnode.uids import is_valid_uid


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


@dataclass(frozen=True)
class InstanceKeys:
    """What the receive path records for an instance of a series it already knows."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    slice_position: float | None
    images_in_acquisition: int | None
    series_related_instances: int | None


# The attributes behind InstanceKeys; the data set is read no further than the last one.
_SOP_CLASS, _SOP_INSTANCE = 0x00080016, 0x00080018
_STUDY, _SERIES, _NUMBER = 0x0020000D, 0x0020000E, 0x00200013
_POSITION, _ORIENTATION = 0x00200032, 0x00200037
_IN_ACQUISITION, _IN_SERIES = 0x00201002, 0x00201209
_KEY_TAGS = [
    _SOP_CLASS,
    _SOP_INSTANCE,
    _STUDY,
    _SERIES,
    _NUMBER,
    _POSITION,
    _ORIENTATION,
    _IN_ACQUISITION,
    _IN_SERIES,
]
_UID_NAMES = {
    _SOP_CLASS: "SOPClassUID",
    _SOP_INSTANCE: "SOPInstanceUID",
    _STUDY: "StudyInstanceUID",
    _SERIES: "SeriesInstanceUID",
}
_READ_ERRORS = (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError)


def _past_keys(tag: int, vr: str | None, length: int) -> bool:
    return tag > _IN_SERIES


def _text(ds: Dataset, tag: int) -> str:
    """A short text value as stored (UI, IS, DS: ASCII, PS3.5 §6.2), without padding."""
    element = ds.get_item(tag)
    raw = element.value if element is not None else None
    if isinstance(raw, bytes):
        return raw.decode("ascii", "replace").rstrip("\x00 ").strip()
    if raw is None:
        return ""
    if isinstance(raw, MultiValue | list | tuple):
        return "\\".join(str(v) for v in raw)
    return str(raw).strip()


def _numbers(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split("\\")] if text else None
    except ValueError:
        return None


def _integer(text: str) -> int | None:
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None


def read_keys(data: bytes) -> InstanceKeys:
    """The UIDs and numbers only, reading no further than (0020,1209): the receive path.

    Any transfer syntax pydicom can read, deflated included; raises InvalidInstanceError
    on garbage or on a missing or malformed UID (PS3.5 §9.1), as :func:`read_header` does.
    """
    try:
        ds = read_partial(io.BytesIO(data), stop_when=_past_keys, specific_tags=_KEY_TAGS)
    except _READ_ERRORS as exc:
        raise InvalidInstanceError(f"not a readable DICOM instance: {exc}") from exc
    uids: dict[int, str] = {}
    for tag, name in _UID_NAMES.items():
        uid = _text(ds, tag)
        if not uid:
            raise InvalidInstanceError(f"instance lacks a required UID: {name}")
        if not is_valid_uid(uid):
            raise InvalidInstanceError(f"{name} is not a valid UID (PS3.5 §9.1): {uid!r}")
        uids[tag] = uid
    position, _ = geometry(_numbers(_text(ds, _ORIENTATION)), _numbers(_text(ds, _POSITION)))
    meta = getattr(ds, "file_meta", None)
    return InstanceKeys(
        study_instance_uid=uids[_STUDY],
        series_instance_uid=uids[_SERIES],
        sop_instance_uid=uids[_SOP_INSTANCE],
        sop_class_uid=uids[_SOP_CLASS],
        transfer_syntax_uid=str(getattr(meta, "TransferSyntaxUID", "") or ""),
        instance_number=_integer(_text(ds, _NUMBER)),
        slice_position=position,
        images_in_acquisition=_integer(_text(ds, _IN_ACQUISITION)),
        series_related_instances=_integer(_text(ds, _IN_SERIES)),
    )


def read_header(data: bytes) -> InstanceHeader:
    """Parse the header of an encoded instance (with file meta); raise on garbage."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=False)
    except _READ_ERRORS as exc:
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
