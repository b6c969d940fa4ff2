"""Store one received instance durably and record it: the work behind a C-STORE.

This module owns the **durable ordering**; the rows themselves are written by
:class:`sijnode.db.instances.InstanceRecorder`. The data set arrives in a
:class:`StagedFile` (written and hashed while its fragments were on the wire). Nothing
acknowledged is ever lost because the steps run in this order:

1. **seal:** the file's final fsync starts in a helper thread;
2. **record:** meanwhile the header keys are read and the instance's rows written in one
   transaction (a new instance of a known series in one round trip; study and series
   rows for the first instance; a late instance reopens its study);
3. **place:** once the seal is done, the file is renamed to its final spool path;
4. **sync:** its directory is fsynced in a helper ...
5. **commit:** ... while the transaction commits.

Only when both 4 and 5 are done does the caller answer Success. On any failure before
that the transaction rolls back, the file is removed and the caller answers a failure.

**The hot path commits early.** A new instance of a known, receiving series (all but the
first instance of a series, :attr:`IngestResult.fresh`) writes one row and nothing else,
so its transaction commits *while* the file's fsync runs (2 beside 1), and the file is
placed and its directory synced after: the two flushes that durability needs overlap
instead of following each other, and the writer's turn no longer waits for the file's
fsync (issue 15, docs/benchmarks.md). With SQLite's default ``sqlite_synchronous = "spool"``
that commit skips its WAL fsync (``synchronous=NORMAL``): the file, fsynced before Success,
holds everything the row does, and start-up recovery records a file whose row a power
loss took (docs/receiving.md, "Durability of the audit row"). Until the file is in place
the row is *unplaced*:

- the study is not judged complete (:meth:`Ingestor.writer_turn`), so no job reads
  a file that is not there yet;
- if the seal, place or sync fails, the row is deleted again (the instance was never
  acknowledged) and the caller answers a failure; if even that delete fails (the audit
  went down at that moment), the study stays held back and the delete is retried
  (:meth:`Ingestor.retry_unrecord`);
- after a crash in that window the row's file is missing in a study still receiving,
  which the start-up recovery removes as never acknowledged (:meth:`Node.recover`);
- an identical copy arriving meanwhile on another association waits for the first one's
  outcome instead of placing the same file a second time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.header import InstanceHeader, read_header
from sijnode.daemon.keys import InstanceKeys, read_keys
from sijnode.daemon.spool import Spool, content_hash
from sijnode.daemon.staging import HEAD_BYTES, StagedFile, adopt_staged, open_staged
from sijnode.db.engine import transaction
from sijnode.db.instances import (
    IngestOutcome,
    IngestResult,
    InstanceRecorder,
    NeedHeader,
    PendingRows,
)
from sijnode.db.schema import Instance, utcnow
from sijnode.errors import InvalidInstanceError, SijnodeError, SpoolError
from sijnode.logs import fields
from sijnode.settings import DatabaseSettings

__all__ = ["IngestOutcome", "IngestResult", "Ingestor"]

log = logging.getLogger(__name__)


@dataclass
class _Unplaced:
    """A committed row whose file is not in place yet (the hot path, module docstring)."""

    study_id: int
    instance_id: int
    done: threading.Event = field(default_factory=threading.Event)
    placed: bool = False


@dataclass
class _LongWay:
    """What the long way did so far: the file it placed, its flush, a copy to wait for."""

    published: str | None = None
    synced: Future[None] | None = None
    wait_for: _Unplaced | None = None


class Ingestor:
    """Stores and records instances; one per node, shared by association threads."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        audit: DatabaseSettings,
        site: str = "default",
        workers: int = 8,
        fresh_sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        # The hot path's one-row commits (sijnode.db.engine.fresh_row_sessions).
        self.fresh_sessions = fresh_sessions or sessions
        self.audit = audit
        self.rows = InstanceRecorder(audit, site, spool.relpath_for)
        # One writer at a time: get-or-create of study and series rows stays simple, and
        # SQLite serialises writers anyway.
        self._lock = threading.Lock()
        # Helpers hash and flush fragments while they arrive, and fsync the finished file.
        self._helpers = ThreadPoolExecutor(workers, thread_name_prefix="sijnode-stage")
        # Committed rows whose files are not placed yet, by spool path, and rows of failed
        # instances whose delete failed too (retried by retry_unrecord()); both hold their
        # studies back from completion. Changed under ``_lock``.
        self._unplaced: dict[str, _Unplaced] = {}
        self._unrecord_owed: list[_Unplaced] = []

    def staged_file(self) -> StagedFile:
        """A new file in the spool's temporary directory for a data set about to arrive."""
        return open_staged(self.spool, self._helpers)

    def adopted_file(self, path: Path) -> StagedFile:
        """A data set pynetdicom received into ``path`` itself (the standard receive mode)."""
        return adopt_staged(self.spool, self._helpers, path)

    def ingest(
        self,
        staged: StagedFile,
        association_id: int | None = None,
        calling_ae_title: str | None = None,
        received_at: datetime | None = None,
    ) -> IngestResult:
        """Make ``staged`` (a complete data set with file meta) durable and record it.

        Seal, record, place, sync, commit (module docstring): the rows commit while the
        renamed file's directory is fsynced, and this returns only once the file is
        durable under its final name and the rows are committed. Raises
        InvalidInstanceError, SpoolError (DiskFullError) or AuditError; on any of them
        nothing was acknowledged, the temporary file is gone and the caller must answer
        with a failure status.
        """
        early: _Unplaced | None = None  # the hot path: committed before the file is placed
        long = _LongWay()  # the other paths' file and flush
        staged.start_seal()  # 1. seal: the final fsync runs in a helper meanwhile
        try:
            header = self._read(staged)
            now = received_at or utcnow()
            self._lock.acquire()  # the writer's turn
            try:
                fresh = self._record_fresh(staged, header, association_id, now)
                if fresh is not None:
                    result, early = fresh
                    relpath = result.relpath
                else:
                    # the long way (first instance of a series, duplicates, late instances)
                    result = self._record_long(
                        staged, header, association_id, calling_ae_title, now, long
                    )
                    relpath = result.relpath
            finally:
                # The writer's turn ends with the commit; the directory fsync is waited
                # for outside it, so the next association's instance records meanwhile.
                self._lock.release()
                if long.synced is not None:
                    long.synced.result()
            if early is not None:
                self._place_early(staged, relpath, early)
            elif long.wait_for is not None:
                long.wait_for.done.wait()
                if not long.wait_for.placed:
                    raise SpoolError(
                        "an identical copy of this instance, received at the same time on "
                        "another association, could not be stored; send it again"
                    )
        except BaseException:
            staged.discard()
            if early is None:
                self._discard_published(long.published)
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "instance received",
                extra=fields(
                    outcome=result.outcome.value,
                    study_instance_uid=header.study_instance_uid,
                    series_instance_uid=header.series_instance_uid,
                    sop_instance_uid=header.sop_instance_uid,
                    modality=getattr(header, "modality", None),
                    size=staged.size,
                ),
            )
        return result

    def _record_fresh(
        self,
        staged: StagedFile,
        header: InstanceHeader | InstanceKeys,
        association_id: int | None,
        now: datetime,
    ) -> tuple[IngestResult, _Unplaced] | None:
        """2. record and 5. commit beside 1. seal, if this is the hot path (docstring).

        The one row commits through ``fresh_sessions`` (with SQLite's default ``spool``
        mode: ``synchronous=NORMAL``, the spool file being the durable copy). Returns the
        result and its unplaced entry (3. place and 4. sync follow), or None: not a new
        instance of a known, receiving series, or its staging failed; nothing written.
        Under the writer's turn.
        """
        if staged.error is not None:
            return None
        with transaction(self.fresh_sessions) as session:
            result = self.rows.record_fresh(
                session, header, staged.digest, staged.size, association_id, now
            )
            if result is None:
                return None
            early = _Unplaced(result.study_id, result.instance_id)
            self._hold(result.relpath, early)
            try:
                session.commit()
            except BaseException:
                self._release(result.relpath, early, placed=False, turn_held=True)
                raise
        return result, early

    def _record_long(
        self,
        staged: StagedFile,
        header: InstanceHeader | InstanceKeys,
        association_id: int | None,
        calling_ae_title: str | None,
        now: datetime,
        long: _LongWay,
    ) -> IngestResult:
        """2. record, 3. place, 4. sync beside 5. commit, in one transaction of ``sessions``.

        Fills ``long`` as it goes (the caller waits for its flush and cleans up after a
        failure). Under the writer's turn.
        """
        with transaction(self.sessions) as session:
            # 2. record (the per-transaction cache entries live in ``pending``)
            try:
                pending = PendingRows()
                result = self._record(
                    session, pending, header, staged, association_id, calling_ae_title, now
                )
            except NeedHeader:
                session.rollback()
                header = self._header(staged)
                pending = PendingRows()
                result = self._record(
                    session, pending, header, staged, association_id, calling_ae_title, now
                )
            relpath = result.relpath
            if relpath in self._unplaced:
                # the same bytes, committed and being placed by another association
                long.wait_for = self._unplaced[relpath]
                staged.discard()
                session.commit()
            else:
                staged.seal()  # SpoolError: the transaction rolls back
                # A duplicate whose file is gone (removed, or a removal interrupted
                # by a crash) is placed again: the same bytes under the same name.
                if self.spool.path(relpath).exists():
                    staged.discard()
                    session.commit()
                else:
                    staged.close()
                    directory = self.spool.place(staged.path, relpath)  # 3. place
                    long.published = relpath
                    # 4. sync while 5. commit: Success needs both
                    long.synced = self._helpers.submit(self.spool.sync_directory, directory)
                    session.commit()
            self.rows.remember(pending)
        return result

    def _hold(self, relpath: str, unplaced: _Unplaced) -> None:
        """Mark a row as committed before its file is placed (under the writer's turn)."""
        self._unplaced[relpath] = unplaced

    def _release(
        self, relpath: str, unplaced: _Unplaced, placed: bool, turn_held: bool = False
    ) -> None:
        """The file is placed (or its row is gone again): the study may complete.

        ``turn_held``: the caller has the writer's turn already (the lock is not reentrant).
        """
        with contextlib.nullcontext() if turn_held else self._lock:
            if self._unplaced.get(relpath) is unplaced:
                del self._unplaced[relpath]
        unplaced.placed = placed
        unplaced.done.set()

    def _place_early(self, staged: StagedFile, relpath: str, unplaced: _Unplaced) -> None:
        """3. place and 4. sync a file whose row has committed; undo the row on failure."""
        published = False
        try:
            staged.seal()  # SpoolError
            staged.close()
            directory = self.spool.place(staged.path, relpath)  # 3. place
            published = True
            self.spool.sync_directory(directory)  # 4. sync
        except BaseException:
            if published:
                self.spool.path(relpath).unlink(missing_ok=True)
            if not self._unrecord(unplaced):
                with self._lock:  # the study stays held back until the row is gone
                    self._unrecord_owed.append(unplaced)
            self._release(relpath, unplaced, placed=False)
            raise
        self._release(relpath, unplaced, placed=True)

    def _unrecord(self, unplaced: _Unplaced) -> bool:
        """Delete the row of an instance that was never acknowledged; False if it failed."""
        try:
            with self._lock, transaction(self.sessions) as session:
                session.execute(delete(Instance).where(Instance.id == unplaced.instance_id))
        except SijnodeError as exc:
            log.error(
                "row of an unacknowledged instance could not be removed; retrying later",
                extra=fields(instance_id=unplaced.instance_id, error=str(exc)),
            )
            return False
        log.warning(
            "instance not stored: its row was removed again",
            extra=fields(instance_id=unplaced.instance_id, study_id=unplaced.study_id),
        )
        return True

    def retry_unrecord(self) -> None:
        """Retry the deletes owed for failed instances (the completion loop calls this)."""
        with self._lock:
            owed = list(self._unrecord_owed)
        # An entry leaves the list only once its row is gone, so the study stays held
        # back while the delete is retried (a second retry of the same row is a no-op).
        removed = {id(unplaced) for unplaced in owed if self._unrecord(unplaced)}
        with self._lock:
            self._unrecord_owed = [u for u in self._unrecord_owed if id(u) not in removed]

    @contextmanager
    def writer_turn(self) -> Iterator[frozenset[int]]:
        """The writer's turn, and the studies with a committed row whose file is not in
        place yet (they must not be judged complete): for the completion loop."""
        with self._lock:
            yield frozenset(u.study_id for u in [*self._unplaced.values(), *self._unrecord_owed])

    def _record(
        self,
        session: Session,
        pending: PendingRows,
        header: InstanceHeader | InstanceKeys,
        staged: StagedFile,
        association_id: int | None,
        calling_ae_title: str | None,
        now: datetime,
    ) -> IngestResult:
        """The record step: the one call that writes the instance's rows (bench times it)."""
        return self.rows.record(
            session,
            pending,
            header,
            staged.digest,
            staged.size,
            None,
            association_id,
            calling_ae_title,
            now,
            # the one-round-trip attempt was just made, unless staging failed
            fast=staged.error is not None,
        )

    def _read(self, staged: StagedFile) -> InstanceHeader | InstanceKeys:
        """Only the keys when the study and series are known; else the whole header."""
        try:
            uids = read_keys(staged.head)
        except InvalidInstanceError:
            if staged.size <= HEAD_BYTES or staged.error is not None:
                raise
            return self._header(staged)
        if self.rows.knows(uids.study_instance_uid, uids.series_instance_uid):
            return uids
        return self._header(staged)

    @staticmethod
    def _header(staged: StagedFile) -> InstanceHeader:
        """The header, from the bytes kept in memory or, if it is longer, from the file."""
        try:
            return read_header(staged.head)
        except InvalidInstanceError:
            if staged.size <= HEAD_BYTES or staged.error is not None:
                raise
        return read_header(staged.read())

    def _discard_published(self, published: str | None) -> None:
        """After a failure: remove a published file that no row owns."""
        if published is None:
            return
        try:
            with transaction(self.sessions) as session:
                owned = self.rows.owner_of(session, published)
        except SijnodeError:
            owned = None  # audit unreachable: the file was not recorded by us
        if owned is None:
            self.spool.path(published).unlink(missing_ok=True)

    def close(self) -> None:
        """Finish pending ingests, stop the helper threads, close the hot path's engine."""
        self._helpers.shutdown(wait=True)
        if self.fresh_sessions is not self.sessions:
            engine = self.fresh_sessions.kw.get("bind")
            if isinstance(engine, Engine):
                engine.dispose()

    def record_spooled(self, relpath: str) -> IngestResult | None:
        """Record a spooled file that has no row (a crash between write and commit)."""
        data = self.spool.read(relpath)
        header = read_header(data)
        sha = content_hash(data)
        with self._lock:
            with transaction(self.sessions) as session:
                same = self.rows.find_duplicate(session, header.sop_instance_uid, sha)
                if same is not None and same.removed_at is None:
                    return None  # (a removed row is given its file back by record())
                pending = PendingRows()
                result = self.rows.record(
                    session, pending, header, lambda: sha, len(data), relpath, None, None, utcnow()
                )
            self.rows.remember(pending)  # committed
        return result
