"""The spool: every received instance kept durably as its original bytes.

A file is written to a temporary name, fsynced, renamed into place, and its directory
fsynced (so a crash leaves either the whole file or nothing under its final name). Paths
are built only from UIDs that pass the PS3.5 §9.1 grammar, plus a content-hash suffix so
two different objects under one SOP Instance UID are both kept.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from sijnode.errors import DiskFullError, InvalidInstanceError, SpoolError
from sijnode.uids import is_valid_uid

TMP_DIR = ".tmp"
SUFFIX = ".dcm"


def content_hash(data: bytes) -> str:
    """SHA-256 of the exact bytes received."""
    return hashlib.sha256(data).hexdigest()


class Spool:
    """A directory tree ``<study>/<series>/<sop>.<hash16>.dcm`` under ``root``."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)

    def relpath_for(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
        """The spool path of an instance; refuses anything that is not a valid UID."""
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_uid),
        ):
            if not is_valid_uid(uid):
                raise InvalidInstanceError(f"{name} is not a valid UID (PS3.5 §9.1): {uid!r}")
        return f"{study_uid}/{series_uid}/{sop_uid}.{sha256[:16]}{SUFFIX}"

    def free_bytes(self) -> int:
        """Free space on the spool's filesystem."""
        return shutil.disk_usage(self.root).free

    def check_free_space(self, incoming: int) -> None:
        """Raise DiskFullError when writing ``incoming`` bytes would pass the minimum."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise DiskFullError(
                f"spool has {free // 2**20} MiB free, below the minimum of "
                f"{self.min_free_bytes // 2**20} MiB; instance refused"
            )

    def place(self, tmp: Path, relpath: str) -> Path:
        """Rename a staged (fsynced) file to ``relpath``; its directory, to be fsynced.

        New directories are made durable here; the caller fsyncs the returned directory
        (:meth:`sync_directory`) before it acknowledges the instance.
        """
        final = self.root / relpath
        try:
            if not final.parent.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                fsync_directory(final.parent.parent)
                fsync_directory(self.root)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise spool_error(exc, relpath) from exc
        return final.parent

    def sync_directory(self, directory: Path) -> None:
        """fsync a directory, so the renames into it survive a crash."""
        try:
            fsync_directory(directory)
        except OSError as exc:
            raise spool_error(exc, "a spool directory") from exc

    def discard(self, tmp: Path) -> None:
        """Remove a staged file that will not be published."""
        tmp.unlink(missing_ok=True)

    def path(self, relpath: str) -> Path:
        """Absolute path of a spooled file."""
        return self.root / relpath

    def read(self, relpath: str) -> bytes:
        """The original bytes of a spooled instance."""
        return (self.root / relpath).read_bytes()

    def iter_files(self) -> list[str]:
        """Every spooled instance, as relative paths (temporary files excluded)."""
        out = []
        for path in self.root.rglob(f"*{SUFFIX}"):
            rel = path.relative_to(self.root)
            if rel.parts[0] != TMP_DIR:
                out.append(rel.as_posix())
        return sorted(out)

    def remove_partial_files(self) -> int:
        """Delete leftovers of writes interrupted by a crash; they were never acknowledged."""
        count = 0
        # *.part: the fast path's; tmp*.dcm: pynetdicom's own (the standard receive mode)
        for path in (self.root / TMP_DIR).iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        return count


def spool_error(exc: OSError, what: str) -> SpoolError:
    """The spool error for an OSError: DiskFullError when the filesystem is full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"spool filesystem is full: {exc.strerror}")
    return SpoolError(f"could not write {what}: {exc.strerror}")


def fsync_directory(path: Path) -> None:
    """fsync a directory (its entries: POSIX needs this after a create or rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
