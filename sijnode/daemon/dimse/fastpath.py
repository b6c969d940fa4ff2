"""The receive fast path: every use of pynetdicom internals in the code base, in one place.

The listener answers each C-STORE on the association's reader thread, as soon as the last
fragment of its data set is in and the instance is durable (docs/receiving.md). pynetdicom
3.0 has no public hook for that, so this module reaches below its API, and nothing else in
sijnode does. It changes pynetdicom **for the listener's AE only**: every other AE in the
process (a result sender, a test's SCU) runs on stock pynetdicom.

For the listener's associations (by the AE of the thread's association):

- **Chunked receive into the spool.** ``pynetdicom.dimse_messages`` sees
  ``STORE_RECV_CHUNKED_DATASET`` on and gets its file from the listener
  (:class:`~sijnode.daemon.staging.StagedFile` in the spool) instead of
  ``NamedTemporaryFile``; its file meta is encoded directly (:mod:`sijnode.daemon.filemeta`).
- **Answered requests** are kept off the association thread (:class:`UnansweredRequests`,
  swapped in by :func:`prepare`), and pynetdicom's standard debug-log handlers are unbound
  from the association (the node writes its own log lines).
- **The answer** is a C-STORE-RSP encoded here (:func:`encode_c_store_rsp`) and written to
  the association's socket by the reader thread (:func:`answer`).

The flag is not set on ``pynetdicom._config``: ``dimse_messages`` sees a stand-in whose flag
is on only on a listener's threads, and which passes everything else through.

:func:`install` checks first that pynetdicom is the release this was written for and that
every attribute replaced is the one expected (identity checks on the functions, the queue
type, the names the patched functions look up, and a round trip of the encoded answer
through pynetdicom's decoder). If a check fails it logs one warning and patches nothing;
the listener then receives in the standard mode (:mod:`sijnode.daemon.receive`).
:func:`uninstall` restores every attribute once the last listener has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import tempfile
import threading
import types
import weakref
from typing import Any, Protocol

import pydicom.filewriter
import pynetdicom
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dsutils
from pynetdicom import AE, evt

from sijnode.daemon import filemeta
from sijnode.daemon.staging import StagedFile
from sijnode.logs import fields

log = logging.getLogger(__name__)

#: The pynetdicom releases this module was written against (``major.minor``).
SUPPORTED_RELEASE = "3.0"


class Listener(Protocol):
    """What the fast path needs of the listener."""

    def staged_file(self, assoc: Any) -> StagedFile: ...


# Listeners by their AE; only these AEs' associations see the fast path.
_LISTENERS: weakref.WeakKeyDictionary[AE, Listener] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
# module → {attribute: original value}, while installed
_SAVED: dict[types.ModuleType, dict[str, Any]] = {}

_DEFAULT_TEMPORARY_FILE = tempfile.NamedTemporaryFile
_DEFAULT_CREATE_FILE_META = pynetdicom.dsutils.create_file_meta
_DEFAULT_WRITE_FILE_META_INFO = pydicom.filewriter.write_file_meta_info


def _listener_association() -> tuple[Any, Listener] | None:
    """The association of the current thread and its listener, if the AE is a listener's.

    pynetdicom runs an association on its own thread (the Association object) and reads
    its socket on another (the DUL, which knows the association).
    """
    thread = threading.current_thread()
    assoc = (
        thread
        if isinstance(thread, pynetdicom.association.Association)
        else getattr(thread, "assoc", None)
    )
    if assoc is None:
        return None
    listener = _LISTENERS.get(assoc.ae)
    return None if listener is None else (assoc, listener)


class _ScopedConfig:
    """``pynetdicom._config`` as ``dimse_messages`` sees it: chunked receive is on for the
    listener's associations; everything else is the real module."""

    def __init__(self, real: types.ModuleType) -> None:
        object.__setattr__(self, "_real", real)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # pynetdicom's name
        return _listener_association() is not None or bool(self._real.STORE_RECV_CHUNKED_DATASET)


def _chunk_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's file for a received data set: a spool StagedFile for a listener."""
    found = _listener_association()
    if found is None:
        return _DEFAULT_TEMPORARY_FILE(*args, **kwargs)
    assoc, listener = found
    return listener.staged_file(assoc)


def _create_file_meta(**kwargs: Any) -> Any:
    if _listener_association() is None:
        return _DEFAULT_CREATE_FILE_META(**kwargs)
    return filemeta.create_file_meta(**kwargs)


class UnansweredRequests(queue.Queue[Any]):
    """An association's queue of received DIMSE messages, without answered C-STOREs.

    pynetdicom queues every decoded request for the association thread; a C-STORE the
    reader thread has already answered (:func:`answer`) must not be answered twice, so it
    is dropped here.
    """

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        staged = staged_of_request(item[1])
        if staged is not None and staged.answered:
            return
        super().put(item, block, timeout)


def _patches() -> dict[types.ModuleType, dict[str, Any]]:
    scoped = _ScopedConfig(pynetdicom._config)
    return {
        pynetdicom.dimse_messages: {
            "_config": scoped,
            "NamedTemporaryFile": _chunk_file,
            "create_file_meta": _create_file_meta,
            # passes any other file meta to pydicom's own writer
            "write_file_meta_info": filemeta.write_file_meta_info,
        },
    }


def _expected() -> dict[types.ModuleType, dict[str, Any]]:
    """What each patched attribute must be before it is patched."""
    return {
        pynetdicom.dimse_messages: {
            "_config": pynetdicom._config,
            "NamedTemporaryFile": _DEFAULT_TEMPORARY_FILE,
            "create_file_meta": _DEFAULT_CREATE_FILE_META,
            "write_file_meta_info": _DEFAULT_WRITE_FILE_META_INFO,
        },
    }


def _names(function: Any) -> set[str]:
    return set(function.__code__.co_names)


def check() -> list[str]:
    """What is not as the fast path expects; empty when it can be installed."""
    problems: list[str] = []
    release = ".".join(pynetdicom.__version__.split(".")[:2])
    if release != SUPPORTED_RELEASE:
        problems.append(f"pynetdicom {pynetdicom.__version__}, expected {SUPPORTED_RELEASE}.x")
    for module, attributes in _expected().items():
        for name, value in attributes.items():
            if getattr(module, name, None) is not value:
                problems.append(f"{module.__name__}.{name} is not the expected object")
    try:
        from pynetdicom import _handlers
        from pynetdicom.dimse import DIMSEServiceProvider
        from pynetdicom.dimse_messages import DIMSEMessage
        from pynetdicom.dul import DULServiceProvider

        uses = {
            "DIMSEMessage.decode_msg": (
                DIMSEMessage.decode_msg,
                {"_config", "STORE_RECV_CHUNKED_DATASET", "NamedTemporaryFile"}
                | {"create_file_meta", "write_file_meta_info", "_data_set_file"},
            ),
            "DIMSEMessage.message_to_primitive": (
                DIMSEMessage.message_to_primitive,
                {"_dataset_file", "_data_set_file"},
            ),
            "DIMSEServiceProvider.receive_primitive": (
                DIMSEServiceProvider.receive_primitive,
                {"msg_queue", "put", "EVT_DIMSE_RECV"},
            ),
            "DULServiceProvider.__init__": (DULServiceProvider.__init__, {"socket"}),
        }
        function: Any
        for where, (function, names) in uses.items():
            missing = names - _names(function)
            if missing:
                problems.append(f"{where} no longer uses {', '.join(sorted(missing))}")
        if type(DIMSEServiceProvider(None).msg_queue) is not queue.Queue:  # type: ignore[arg-type]
            problems.append("DIMSEServiceProvider.msg_queue is not a queue.Queue")
        for handler in _LOG_HANDLERS.values():
            if not callable(getattr(_handlers, handler, None)):
                problems.append(f"pynetdicom._handlers.{handler} is missing")
        problems += _check_response()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        problems.append(f"pynetdicom internals changed: {type(exc).__name__}: {exc}")
    return problems


def _check_response() -> list[str]:
    """The encoded C-STORE-RSP decodes in this pynetdicom to the values encoded."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    encoded = encode_c_store_rsp(7, 4242, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0xA700)
    pdu = P_DATA_TF()
    pdu.decode(encoded)
    message = DIMSEMessage()
    if not message.decode_msg(pdu.to_primitive()):
        return ["pynetdicom does not decode the encoded C-STORE-RSP"]
    primitive: Any = message.message_to_primitive()
    decoded = (
        isinstance(primitive, C_STORE),
        message.context_id,
        primitive.MessageIDBeingRespondedTo,
        primitive.AffectedSOPClassUID,
        primitive.AffectedSOPInstanceUID,
        primitive.Status,
    )
    if decoded != (True, 7, 4242, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 0xA700):
        return [f"the encoded C-STORE-RSP decodes to {decoded}"]
    return []


def install(ae: AE, listener: Listener) -> bool:
    """Give ``ae`` (the listener's) the fast path; False (one warning, nothing patched)
    when the installed pynetdicom is not what it expects."""
    with _LOCK:
        if not _SAVED:
            problems = check()
            if problems:
                log.warning(
                    "receive fast path unavailable; receiving in standard mode",
                    extra=fields(pynetdicom=pynetdicom.__version__, problems=problems),
                )
                return False
            patches = _patches()
            try:
                for module, attributes in patches.items():
                    _SAVED[module] = {name: getattr(module, name) for name in attributes}
                    for name, value in attributes.items():
                        setattr(module, name, value)
            except BaseException:
                _restore()
                raise
        _LISTENERS[ae] = listener
    return True


def _restore() -> None:
    for module, attributes in _SAVED.items():
        for name, value in attributes.items():
            setattr(module, name, value)
    _SAVED.clear()


def uninstall(ae: AE) -> None:
    """Take the fast path from ``ae``; restore pynetdicom once no listener has it."""
    with _LOCK:
        _LISTENERS.pop(ae, None)
        if not _LISTENERS:
            _restore()


def installed() -> bool:
    """Whether pynetdicom is patched now (for at least one listener)."""
    return bool(_SAVED)


_LOG_HANDLERS = {
    evt.EVT_PDU_RECV: "standard_pdu_recv_handler",
    evt.EVT_PDU_SENT: "standard_pdu_sent_handler",
    evt.EVT_DIMSE_RECV: "standard_dimse_recv_handler",
    evt.EVT_DIMSE_SENT: "standard_dimse_sent_handler",
}


def prepare(assoc: Any) -> bool:
    """Ready a listener association, before it is accepted (EVT_REQUESTED); False if its
    message queue is not the one expected: the reader thread must then not answer, and
    the association thread answers every C-STORE (:func:`answer` is not used)."""
    from pynetdicom import _handlers

    for event, name in _LOG_HANDLERS.items():
        assoc.unbind(event, getattr(_handlers, name))
    if type(assoc.dimse.msg_queue) is not queue.Queue or not assoc.dimse.msg_queue.empty():
        return False
    assoc.dimse.msg_queue = UnansweredRequests()
    return True


def staged_of_message(message: Any) -> StagedFile | None:
    """The spool file a received DIMSE message's data set was written to (EVT_DIMSE_RECV)."""
    staged = getattr(message, "_data_set_file", None)
    return staged if isinstance(staged, StagedFile) else None


def staged_of_request(request: Any) -> StagedFile | None:
    """The spool file of a C-STORE request primitive (EVT_C_STORE)."""
    staged = getattr(request, "_dataset_file", None)
    return staged if isinstance(staged, StagedFile) else None


def answer(event: Any, status: int) -> bool:
    """Send the C-STORE-RSP for the request of ``event`` (EVT_DIMSE_RECV) from the
    reader thread, the only one that writes to the socket meanwhile; False if the
    association is closing (the association thread then decides)."""
    message = event.message
    command = message.command_set
    context_id = message.context_id
    assert context_id is not None  # set with the command set
    pdu = encode_c_store_rsp(
        context_id,
        int(command.MessageID),
        str(command.AffectedSOPClassUID),
        str(command.AffectedSOPInstanceUID or ""),
        status,
    )
    sock = event.assoc.dul.socket
    if sock is None:
        return False
    sock.send(pdu)
    quick_ack(sock.socket)
    return True


def quick_ack(sock: socket.socket | None) -> None:
    """Acknowledge the peer's next segments at once (Linux ``TCP_QUICKACK``, tcp(7)).

    Sending the answer right after the data set puts the kernel in its interactive mode,
    where it delays ACKs by up to 40 ms; a sender that writes a PDU's header and body
    separately with Nagle's algorithm on (DCMTK ``storescu``) then waits for that ACK
    before its next write. Measured in the stream benchmark: up to 70 such stalls of about
    41 ms per 300-instance study, none against a bare pynetdicom SCP. The option is not
    sticky, so it is set again after every answer; elsewhere it does not exist and this
    does nothing.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or option is None:
        return
    with contextlib.suppress(OSError):  # the peer may have gone; the read then fails
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)


# -- the C-STORE-RSP, encoded straight into a P-DATA-TF PDU ------------------------------
#
# Building the response through pynetdicom's primitives, message classes and PDU objects
# costs more than the rest of the answer. It is seven fixed elements:
# - command set: Implicit VR Little Endian, group 0000 in ascending order, with
#   CommandGroupLength first (PS3.7 §6.3.1, §9.3.1.2 and Annex E);
# - one PDV, flagged "command, last fragment", in one P-DATA-TF PDU (PS3.8 §9.3.5, E.2).

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
