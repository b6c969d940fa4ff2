"""The keys of a received instance: the few attributes the receive path records.

Read for every instance before it is answered, so mostly without pydicom: a walk over the
element headers of the common encodings, with pydicom for the rest (:func:`read_keys`).
The whole header is read only for the first instance of a series
(:func:`~sijnode.daemon.header.read_header`).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.filereader import read_partial
from pydicom.multival import MultiValue
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from sijnode.daemon.header import READ_ERRORS, geometry
from sijnode.errors import InvalidInstanceError
from sijnode.uids import is_valid_uid

_TAG = struct.Struct("<HH")
_UINT16 = struct.Struct("<H")
_UINT32 = struct.Struct("<I")


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


def _past_keys(tag: int, vr: str | None, length: int) -> bool:
    return tag > _IN_SERIES


# Explicit VR: these have a reserved 2-byte field and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_WANTED = frozenset(_KEY_TAGS)
# A deflated data set is inflated no further than this for its keys (PS3.5 §A.5).
_INFLATED_BYTES = 256 * 1024


def _walk(
    data: bytes, pos: int, implicit: bool, wanted: frozenset[int], stop: int
) -> tuple[dict[int, bytes], int] | None:
    """Element values by tag, reading element headers only, up to the first tag past
    ``stop``; None where a plain walk cannot go on (undefined length, bytes run out)."""
    found: dict[int, bytes] = {}
    end = len(data)
    previous = -1
    while pos + 8 <= end:
        group, element = _TAG.unpack_from(data, pos)
        tag = group << 16 | element
        if tag <= previous:
            return None  # not in ascending order: not what it claims to be
        previous = tag
        if tag > stop:
            return found, pos
        if not implicit and not data[pos + 4 : pos + 6].isalpha():
            return None  # no VR where explicit VR needs one (e.g. implicit VR mislabelled)
        if implicit:
            (length,) = _UINT32.unpack_from(data, pos + 4)
            pos += 8
        elif data[pos + 4 : pos + 6] in _LONG_VRS:
            if pos + 12 > end:
                return None
            (length,) = _UINT32.unpack_from(data, pos + 8)
            pos += 12
        else:
            (length,) = _UINT16.unpack_from(data, pos + 6)
            pos += 8
        if length == 0xFFFFFFFF or pos + length > end:
            return None
        if tag in wanted:
            found[tag] = data[pos : pos + length]
        pos += length
    return None


def _scan(data: bytes) -> tuple[dict[int, bytes], str] | None:
    """The key values and the transfer syntax, for the common encodings; else None.

    Little endian, explicit or implicit VR (the native and all encapsulated syntaxes),
    with every element before (0020,1209) of defined length: a walk over element
    headers, as PS3.10 §7 and PS3.5 §7.1 lay the file out. A deflated data set
    (PS3.5 §A.5) is inflated from the head onwards, as far as the keys need: ``data``
    may be only the first bytes of a large instance, so the stream is not complete.
    Anything else (big endian, undefined lengths, a header longer than ``data``) goes to
    pydicom.
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        return None
    meta = _walk(data, 132, False, frozenset((0x00020010,)), 0x0002FFFF)
    if meta is None or 0x00020010 not in meta[0]:
        return None
    syntax = meta[0][0x00020010].rstrip(b"\x00 ").decode("ascii", "replace")
    if syntax == ExplicitVRBigEndian:
        return None
    start = meta[1]
    if syntax == DeflatedExplicitVRLittleEndian:
        inflated = _inflate(data[start:])
        if inflated is None:
            return None
        data, start = inflated, 0
    walked = _walk(data, start, syntax == ImplicitVRLittleEndian, _WANTED, _IN_SERIES)
    if walked is None:
        return None
    return walked[0], syntax


def _inflate(deflated: bytes) -> bytes | None:
    """The leading bytes of a raw deflate stream (RFC 1951), which may be cut short."""
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated, _INFLATED_BYTES)
    except zlib.error:
        return None


def _read_with_pydicom(data: bytes) -> tuple[dict[int, Any], str]:
    try:
        ds = read_partial(io.BytesIO(data), stop_when=_past_keys, specific_tags=_KEY_TAGS)
    except READ_ERRORS as exc:
        raise InvalidInstanceError(f"not a readable DICOM instance: {exc}") from exc
    values: dict[int, Any] = {}
    for tag in _KEY_TAGS:
        element = ds.get_item(tag)
        if element is not None:
            values[tag] = element.value
    meta = getattr(ds, "file_meta", None)
    return values, str(getattr(meta, "TransferSyntaxUID", "") or "")


def _text(values: dict[int, Any], tag: int) -> str:
    """A short text value as stored (UI, IS, DS: ASCII, PS3.5 §6.2), without padding."""
    raw = values.get(tag)
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

    Raises InvalidInstanceError on garbage or on a missing or malformed UID (PS3.5 §9.1),
    as :func:`~sijnode.daemon.header.read_header` does. Any transfer syntax pydicom can
    read; the common ones without pydicom (:func:`_scan`).
    """
    scanned = _scan(data)
    values, syntax = scanned if scanned is not None else _read_with_pydicom(data)
    uids: dict[int, str] = {}
    for tag, name in _UID_NAMES.items():
        uid = _text(values, tag)
        if not uid:
            raise InvalidInstanceError(f"instance lacks a required UID: {name}")
        if not is_valid_uid(uid):
            raise InvalidInstanceError(f"{name} is not a valid UID (PS3.5 §9.1): {uid!r}")
        uids[tag] = uid
    orientation = _numbers(_text(values, _ORIENTATION))
    position, _ = geometry(orientation, _numbers(_text(values, _POSITION)))
    return InstanceKeys(
        study_instance_uid=uids[_STUDY],
        series_instance_uid=uids[_SERIES],
        sop_instance_uid=uids[_SOP_INSTANCE],
        sop_class_uid=uids[_SOP_CLASS],
        transfer_syntax_uid=syntax,
        instance_number=_integer(_text(values, _NUMBER)),
        slice_position=position,
        images_in_acquisition=_integer(_text(values, _IN_ACQUISITION)),
        series_related_instances=_integer(_text(values, _IN_SERIES)),
    )
