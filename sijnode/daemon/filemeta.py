"""The File Meta Information of a received instance, encoded directly (PS3.10 §7.1).

pynetdicom's chunked receive builds a pydicom FileMetaDataset and encodes it for every
instance before the data set's first fragment is written; that is most of what receiving
a small instance costs beyond the bytes themselves. The group has seven elements whose
values pynetdicom fixes (``pynetdicom.dsutils.create_file_meta``), so it is encoded here
in Explicit VR Little Endian (PS3.5 §7.1.2), byte for byte as pydicom writes it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.filewriter import write_file_meta_info as pydicom_write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_VERSION = b"\x00\x01"  # FileMetaInformationVersion (PS3.10 §7.1)


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


@dataclass(frozen=True)
class FileMeta:
    """The values pynetdicom's ``create_file_meta`` would put in a FileMetaDataset."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = str(PYNETDICOM_IMPLEMENTATION_UID)
    implementation_version: str = str(PYNETDICOM_IMPLEMENTATION_VERSION)

    def encode(self) -> bytes:
        """Group 0002, group length first, in ascending tag order."""
        body = b"".join(
            (
                struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, len(_VERSION)) + _VERSION,
                _short(0x0002, b"UI", _uid(self.sop_class_uid)),
                _short(0x0003, b"UI", _uid(self.sop_instance_uid)),
                _short(0x0010, b"UI", _uid(self.transfer_syntax)),
                _short(0x0012, b"UI", _uid(self.implementation_uid)),
                _short(0x0013, b"SH", _text(self.implementation_version)),
            )
        )
        return _short(0x0000, b"UL", struct.pack("<I", len(body))) + body


def create_file_meta(
    *, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any, **_: Any
) -> FileMeta:
    """Stands in for ``pynetdicom.dsutils.create_file_meta`` in the chunked receive."""
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """Stands in for pydicom's ``write_file_meta_info`` there; other metas go to pydicom."""
    if isinstance(file_meta, FileMeta):
        fp.write(file_meta.encode())
        return
    pydicom_write_file_meta_info(fp, file_meta, enforce_standard)
