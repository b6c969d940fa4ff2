"""How the listener receives C-STORE data sets: the fast path or pynetdicom's standard way.

``node.receive_mode`` chooses (docs/receiving.md):

- ``fast`` (the default): :mod:`sijnode.daemon.dimse.fastpath`. Each data set is written
  into the spool while its fragments arrive and answered on the reader thread. If the
  installed pynetdicom is not the one the fast path was written for, it logs one warning
  and the listener receives in the standard mode instead.
- ``standard``: only pynetdicom's documented API. Its chunked receive
  (``_config.STORE_RECV_CHUNKED_DATASET``) writes each data set to a temporary file, in the
  spool's temporary directory (``tempfile.tempdir``) so that publishing it is a rename on
  the same filesystem; the C-STORE handler takes it over (``event.dataset_path``) and
  pynetdicom answers with the status it returns. These two are process-wide settings
  (a documented pynetdicom configuration option and Python's documented default temporary
  directory), set while a listener runs and restored when the last one stops.

Both modes accept every storage SOP class, private ones included
(:mod:`sijnode.daemon.dimse.sop_classes`).

The durability rules are the same in both modes (:mod:`sijnode.daemon.ingest`).
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

from pynetdicom import AE, _config

from sijnode.daemon.dimse import fastpath

ReceiveMode = Literal["fast", "standard"]

_LOCK = threading.Lock()
_standard_users = 0
_standard_saved: dict[str, Any] = {}


def start_receiving(
    ae: AE, listener: fastpath.Listener, mode: ReceiveMode, tmp_dir: Path
) -> ReceiveMode:
    """Set up ``ae``'s receive path; return the mode in effect."""
    if mode == "fast" and fastpath.install(ae, listener):
        return "fast"
    _standard_on(tmp_dir)
    return "standard"


def stop_receiving(ae: AE, mode: ReceiveMode) -> None:
    """Undo :func:`start_receiving` (the listener's server has stopped)."""
    if mode == "fast":
        fastpath.uninstall(ae)
    else:
        _standard_off()


def _standard_on(tmp_dir: Path) -> None:
    global _standard_users
    with _LOCK:
        if _standard_users == 0:
            _standard_saved.update(
                chunked=_config.STORE_RECV_CHUNKED_DATASET, tempdir=tempfile.tempdir
            )
            # pynetdicom's documented configuration option for chunked receive
            _config.STORE_RECV_CHUNKED_DATASET = True
            tempfile.tempdir = str(tmp_dir)
        _standard_users += 1


def _standard_off() -> None:
    global _standard_users
    with _LOCK:
        if _standard_users == 0:
            return
        _standard_users -= 1
        if _standard_users == 0:
            _config.STORE_RECV_CHUNKED_DATASET = _standard_saved["chunked"]
            tempfile.tempdir = _standard_saved["tempdir"]
            _standard_saved.clear()
