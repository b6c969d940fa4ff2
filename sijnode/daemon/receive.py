"""How the listener hooks into pynetdicom's receive path (pynetdicom 3.0).

- **Chunked receive** (``_config.STORE_RECV_CHUNKED_DATASET``): pynetdicom writes each
  C-STORE data set to a file as its fragments arrive; the file factory below gives it a
  :class:`~sijnode.daemon.staging.StagedFile` in the listener's spool instead of /tmp.
- **File meta** of received instances encoded directly (:mod:`sijnode.daemon.filemeta`).
- **Answered requests** kept off the association thread (:class:`UnansweredRequests`):
  the listener answers C-STOREs on the reader thread.
- pynetdicom's standard debug-log handlers are unbound; the node logs for itself.

These touch pynetdicom module globals and attributes, so pyproject pins pynetdicom to
3.0.x; the receive tests fail loudly if a release changes them.
"""

from __future__ import annotations

import queue
import tempfile
import threading
import weakref
from typing import Any, Protocol

import pynetdicom.dimse_messages
from pynetdicom import AE, _config
from pynetdicom.association import Association

from sijnode.daemon import filemeta
from sijnode.daemon.staging import StagedFile


class Listener(Protocol):
    """What the factory needs of the listener."""

    def staged_file(self, assoc: Association) -> StagedFile: ...


# Listeners by their AE, for the chunked-receive file factory below.
_LISTENERS: weakref.WeakKeyDictionary[AE, Listener] = weakref.WeakKeyDictionary()
_DEFAULT_TEMPORARY_FILE = tempfile.NamedTemporaryFile


def _chunk_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's file for a received data set: a spool StagedFile for sijnode's AEs.

    pynetdicom creates it on the association's reader thread (its DUL, which knows the
    association); any other AE in the process keeps pynetdicom's own temporary file.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    listener = _LISTENERS.get(assoc.ae) if assoc is not None else None
    if assoc is None or listener is None:
        return _DEFAULT_TEMPORARY_FILE(*args, **kwargs)
    return listener.staged_file(assoc)


def receive_into_spool(ae: AE, listener: Listener) -> None:
    """Have ``listener`` receive ``ae``'s data sets into its spool (idempotent).

    Switches pynetdicom to chunked receive with the factory above.

    Also unbinds pynetdicom's standard log handlers, which format every PDU and DIMSE
    message for its debug log (the node writes its own structured log lines instead), and
    encodes the file meta of received instances directly (:mod:`sijnode.daemon.filemeta`).
    """
    _LISTENERS[ae] = listener
    _config.LOG_HANDLER_LEVEL = "none"
    _config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom.dimse_messages.NamedTemporaryFile = _chunk_file
    # the same file meta bytes, without a pydicom data set per instance (filemeta.py)
    pynetdicom.dimse_messages.create_file_meta = filemeta.create_file_meta  # type: ignore[assignment]  # read only by the writer below
    pynetdicom.dimse_messages.write_file_meta_info = filemeta.write_file_meta_info


class UnansweredRequests(queue.Queue[Any]):
    """An association's queue of received DIMSE messages, without answered C-STOREs.

    pynetdicom queues every decoded request for the association thread; a C-STORE the
    reader thread has already answered (``StorageSCP._on_dimse_received``) must not be
    answered twice, so it is dropped here.
    """

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        staged = getattr(item[1], "_dataset_file", None)
        if isinstance(staged, StagedFile) and staged.answered:
            return
        super().put(item, block, timeout)


def stop_receiving(ae: AE) -> None:
    """Forget ``ae``'s listener (its server has stopped)."""
    _LISTENERS.pop(ae, None)
