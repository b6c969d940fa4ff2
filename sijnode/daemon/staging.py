"""Receive a C-STORE data set straight into the spool while its fragments arrive.

pynetdicom's chunked receive (``_config.STORE_RECV_CHUNKED_DATASET``) writes a preamble, a
file meta and then every P-DATA fragment of the data set (PS3.8 §9.3.5.1) to a file as it
arrives. The listener gives it a :class:`StagedFile` in the spool's temporary directory,
which hashes each fragment and asks the kernel to start writing it out as it arrives; once
the last one is in, a helper thread fsyncs the file while the audit rows are written
(PS3.4 B.2.3: Success only once the instance is safe). The bytes are the sender's;
nothing is decoded or re-encoded.

A failure while receiving (a full disk) never raises into pynetdicom, which would abort the
association: it is kept in :attr:`StagedFile.error` and the C-STORE handler answers with a
failure status instead.

In the standard receive mode pynetdicom writes the file itself; :func:`adopt_staged` takes
it over (hashing it once) so that it is sealed and published by the same rules.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from sijnode.daemon.spool import TMP_DIR, Spool, spool_error
from sijnode.errors import DiskFullError, SpoolError

# The leading bytes kept in memory: the header is parsed from them, not read back.
HEAD_BYTES = 64 * 1024
# Pieces smaller than this together wait for more before they are written.
SMALL_BYTES = 16 * 1024
# Pieces written with one writev(2) at most (well below IOV_MAX).
_MAX_PIECES = 64
# Written bytes are queued for writeback once this many have gathered.
WRITEBACK_BYTES = 128 * 1024
# Read size when a file written by pynetdicom is taken over (standard receive mode).
_READ_BYTES = 1024 * 1024


def _writeback_starter() -> Callable[[int, int, int], object]:
    """Queue a file range for writeback without waiting: Linux sync_file_range(2).

    With SYNC_FILE_RANGE_WRITE the kernel starts writing the range's dirty pages and
    returns, so the fsync after the last fragment waits only for what is still in flight.
    Where the call does not exist this does nothing and the fsync does all the work.
    """
    try:
        call = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):
        return lambda fd, offset, length: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return lambda fd, offset, length: call(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


@functools.cache
def _writeback() -> Callable[[int, int, int], object]:
    """The writeback call, looked up on first use (not at import time)."""
    return _writeback_starter()


def start_writeback(fd: int, offset: int, length: int) -> object:
    """Start writing ``length`` bytes of ``fd`` from ``offset`` out; do not wait."""
    return _writeback()(fd, offset, length)


class StagedFile:
    """One data set being received into the spool's temporary directory.

    Quacks like the ``NamedTemporaryFile`` pynetdicom expects (``write``, ``file.flush``,
    ``name``, ``close``). Writes and hashing happen on the association's reader thread,
    the final fsync on ``helpers``.
    """

    def __init__(
        self,
        path: Path,
        helpers: Executor,
        error: SpoolError | None = None,
        *,
        existing: bool = False,
    ) -> None:
        self.path = path
        self.name = str(path)
        self.file = self
        # Bytes received (written or waiting to be written): the instance's size.
        self.size = 0
        self.error = error
        # Set by the listener once the finished data set has been ingested (or failed).
        self.outcome: Future[Any] | None = None
        self.handling_seconds = 0.0
        # The DIMSE status given, and whether the response was sent by the reader thread.
        self.status: int | None = None
        self.answered = False
        self._helpers = helpers
        self._digest = hashlib.sha256()
        self._head = bytearray()
        self._sealed: Future[None] | None = None
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        self._queued = 0  # bytes already queued for writeback
        self._written = 0  # bytes written to the file
        self._lock = threading.Lock()
        self._fd: int | None = None
        if existing:
            self._take_over()
        elif error is None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except OSError as exc:
                self.error = spool_error(exc, "a temporary file")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append a fragment; a failure is kept for the handler, never raised.

        Small pieces (preamble, file meta) wait and go out with the next large one.
        """
        chunk = data if isinstance(data, bytes) else bytes(data)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        if self.error is None and self._fd is not None:
            self._waiting.append(chunk)
            self._waiting_bytes += len(chunk)
            self.size += len(chunk)
            if self._waiting_bytes >= SMALL_BYTES or len(self._waiting) >= _MAX_PIECES:
                self._write_waiting()
        return len(chunk)

    def _write_waiting(self) -> None:
        pieces, self._waiting, self._waiting_bytes = self._waiting, [], 0
        if not pieces or self.error is not None or self._fd is None:
            return
        try:
            written = os.writev(self._fd, pieces)
            total = sum(map(len, pieces))
            if written < total:  # a short write: finish it piece by piece
                rest = memoryview(b"".join(pieces))[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError as exc:
            self.error = spool_error(exc, "a received instance")
            return
        for piece in pieces:
            # SHA-256 releases the GIL; here it costs less than a hand-off would
            self._digest.update(piece)
        self._written += total
        if self._written - self._queued >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._queued, self._written - self._queued)
            self._queued = self._written

    def _take_over(self) -> None:
        """Read a file written by someone else once: its hash, head and size."""
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            while chunk := os.read(self._fd, _READ_BYTES):
                if len(self._head) < HEAD_BYTES:
                    self._head += chunk[: HEAD_BYTES - len(self._head)]
                self._digest.update(chunk)
                self.size += len(chunk)
        except OSError as exc:
            self.error = spool_error(exc, "a received instance")
        self._written = self.size

    @classmethod
    def adopt(cls, path: Path, helpers: Executor) -> StagedFile:
        """A complete data set that pynetdicom wrote to ``path`` (the standard receive
        mode): read once for its hash, then sealed, published or discarded like any."""
        return cls(path, helpers, existing=True)

    def flush(self) -> None:
        """Nothing to do: every fragment is written through (pynetdicom calls this)."""

    @property
    def head(self) -> bytes:
        """The leading bytes: preamble, file meta and the start of the data set."""
        return bytes(self._head)

    def _settle(self) -> None:
        """Wait for the helpers, if they were started."""
        if self._sealed is not None:
            with contextlib.suppress(SpoolError):
                self._sealed.result()

    def start_seal(self) -> None:
        """Start the hash and the final fsync in helpers (once the last fragment is in)."""
        if self._sealed is None:
            self._sealed = self._helpers.submit(self._fsync)

    def _fsync(self) -> None:
        if self.error is not None:
            raise self.error
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = spool_error(exc, "a received instance")
            raise self.error from exc

    def digest(self) -> str:
        """SHA-256 of everything written."""
        self._write_waiting()
        if self.error is not None:
            raise self.error
        return self._digest.hexdigest()

    def seal(self) -> None:
        """Wait until the complete file is durable. Raises SpoolError or DiskFullError."""
        self.start_seal()
        assert self._sealed is not None
        self._sealed.result()

    def read(self) -> bytes:
        """Everything written so far, read back (for headers longer than :data:`HEAD_BYTES`)."""
        self._write_waiting()
        return self.path.read_bytes()

    def close(self) -> None:
        """Close the file (idempotent; pynetdicom calls it again after the handler)."""
        self._settle()
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the temporary file: it will not be published."""
        self.close()
        self.path.unlink(missing_ok=True)


def adopt_staged(spool: Spool, helpers: Executor, path: Path) -> StagedFile:
    """The data set pynetdicom wrote to ``path`` (standard mode), as a StagedFile.

    pynetdicom writes it in the spool's temporary directory (``tempfile.tempdir``, see
    :mod:`sijnode.daemon.receive`), so it is taken over where it is; a file elsewhere (the
    default temporary directory was changed meanwhile) is copied in first. Below the
    spool's minimum free space the instance is refused, as on the fast path.
    """
    tmp = (spool.root / TMP_DIR).resolve()
    if path.resolve().parent != tmp:
        staged = open_staged(spool, helpers)
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(_READ_BYTES):
                    staged.write(chunk)
        except OSError as exc:
            staged.error = staged.error or spool_error(exc, "a received instance")
        return staged
    staged = StagedFile.adopt(path, helpers)
    if staged.error is None:
        try:
            spool.check_free_space(0)
        except DiskFullError as exc:
            staged.error = exc
    return staged


def open_staged(spool: Spool, helpers: Executor) -> StagedFile:
    """A new staged file; one that refuses every byte when the spool is below its minimum."""
    path = spool.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
    try:
        spool.check_free_space(0)
    except DiskFullError as exc:
        return StagedFile(path, helpers, error=exc)
    return StagedFile(path, helpers)
