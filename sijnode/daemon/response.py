"""The C-STORE response, encoded straight into a P-DATA-TF PDU.

The reader thread answers every C-STORE (see :mod:`sijnode.daemon.scp`); building the
response through pynetdicom's primitives, message classes and PDU objects costs more
than the rest of the answer. The response is seven fixed elements, so it is encoded here
from the standard and written to the association's socket in one piece:

- command set: Implicit VR Little Endian, group 0000 in ascending order, with
  CommandGroupLength first (PS3.7 §6.3.1, §9.3.1.2 and Annex E);
- one PDV, flagged "command, last fragment", in one P-DATA-TF PDU (PS3.8 §9.3.5 and
  Annex E.2).
"""

from __future__ import annotations

import struct

C_STORE_RSP = 0x8001  # CommandField (PS3.7 §9.3.1.2)
NO_DATA_SET = 0x0101  # CommandDataSetType: no data set follows
_P_DATA_TF = 0x04
_COMMAND_LAST_FRAGMENT = 0x03


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # UI values pad to even length with NUL


def encode_c_store_rsp(
    context_id: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
) -> bytes:
    """The whole P-DATA-TF PDU that answers C-STORE request ``message_id``."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class_uid)),
            _element(0x0100, struct.pack("<H", C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, _uid(sop_instance_uid)),
        )
    )
    command = _element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, _COMMAND_LAST_FRAGMENT) + command
    return struct.pack(">BBI", _P_DATA_TF, 0x00, len(pdv)) + pdv
