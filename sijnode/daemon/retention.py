"""Spool retention: the files of finished studies are removed; their audit stays whole.

The policy, per study (docs/receiving.md, "Retention"):

- **receiving**: the study is receiving (also reopened by a late instance) or complete
  and not yet routed. Never removed.
- **waiting**: a job of the study is not final (queued, running, ``no_model``, inferred,
  or reported: its delivery is retrying). Kept ``storage.retention_waiting`` after the
  last change of the study or of such a job; the inputs of a ``running`` job are never
  removed. Never removed under disk pressure.
- **kept**: the study is no longer receiving and every job is final (delivered, shadow,
  failed, superseded; :data:`~sijnode.db.lifecycle.TERMINAL_JOB_STATES`), or routing
  ignored it. Kept ``storage.retention`` after the last of these; below
  ``storage.purge_below_free_mb`` free, kept studies are removed before their retention
  ends, the one final the longest first.
- **eligible**: a kept study whose retention is over, or a waiting one past
  ``retention_waiting``: the next sweeps remove it.

The outputs the node wrote for the study's jobs (``outputs.path``; a relative path is
under the data directory) go with its instances, by the same rule. Each sweep removes at
most ``storage.sweep_max_files`` files and runs in its own thread, never in the C-STORE
path.

**Order of one removal** (crash safety; at most :data:`FILES_PER_REMOVAL` files each):

1. *intent*: one transaction reads the study, checks the rules and commits a
   ``spool_removals`` row, state ``pending``, naming the instance and output rows. If
   the audit cannot be written, nothing is removed.
2. *unlink*: a second transaction first claims the intent (``UPDATE … WHERE status =
   'pending'``: the write lock on SQLite, the row lock on PostgreSQL), locks the study
   row and checks the rules again (a late instance may have reopened the study: then the
   intent is rolled back and nothing is removed). It unlinks the files and fsyncs their
   directories, then
3. *record*: in the same transaction, sets ``removed_at`` and ``removed_reason`` on the
   rows whose file is gone, marks the intent ``done`` and adds a ``spool_purged`` event
   (counts and bytes), and commits.

An instance of the study received meanwhile waits for that lock (the listener touches
the study row first), then sees the removal and stores its file again
(:mod:`sijnode.db.instances`). A process killed between 1 and 3 leaves the intent
pending: :meth:`Retention.recover` (at start-up, and in each sweep for intents older than
:data:`STALE_INTENT_SECONDS`) sets ``removed_at`` on exactly the rows whose file no
longer exists and closes the intent (``done``, or ``rolled_back`` when no file had
gone). So no file is removed without a record (the pending intent, then its row), and no
row claims a removal that did not happen (``removed_at`` is written only once the
unlink is durable, or after recovery has seen the file gone).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.metrics import NodeMetrics
from sijnode.daemon.spool import Spool
from sijnode.db.engine import record_event, transaction
from sijnode.db.lifecycle import TERMINAL_JOB_STATES
from sijnode.db.schema import (
    EventType,
    Instance,
    Job,
    JobState,
    Output,
    RemovalReason,
    RemovalStatus,
    SpoolRemoval,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from sijnode.errors import SijnodeError
from sijnode.logs import fields
from sijnode.settings import StorageSettings

log = logging.getLogger(__name__)

#: Files one removal (one intent, one transaction) covers at most.
FILES_PER_REMOVAL = 500
#: A pending intent this old belongs to a process that died (a sweep finishes sooner).
STALE_INTENT_SECONDS = 60.0
#: Least time between two log lines about disk pressure nothing can relieve.
_PRESSURE_LOG_SECONDS = 300.0
_CHUNK = 500  # ids per IN (...) list


class SpoolState(enum.StrEnum):
    """Where a study's files are in the retention policy (module docstring)."""

    RECEIVING = "receiving"
    WAITING = "waiting"
    KEPT = "kept"
    ELIGIBLE = "eligible"


#: States each reason may remove (disk pressure and the operator: also before retention).
_REMOVABLE = {
    RemovalReason.RETENTION: frozenset({SpoolState.ELIGIBLE}),
    RemovalReason.DISK_PRESSURE: frozenset({SpoolState.KEPT, SpoolState.ELIGIBLE}),
    RemovalReason.MANUAL: frozenset({SpoolState.KEPT, SpoolState.ELIGIBLE}),
}


@dataclass(frozen=True)
class Verdict:
    """The policy's judgement of one study at one time."""

    state: SpoolState
    #: When the study reached this state: the start of its retention clock.
    since: datetime
    #: When its retention ends; None: never while it stays in this state.
    due_at: datetime | None


def judge(
    study_state: StudyState,
    last_change: Iterable[datetime | None],
    jobs: Sequence[tuple[JobState, datetime | None, datetime | None]],
    now: datetime,
    storage: StorageSettings,
) -> Verdict:
    """Judge a study from its state, its times and its jobs' (state, finished, updated).

    ``last_change`` holds the study's own times (completed, last received).
    """
    own = [as_utc(t) for t in last_change if t is not None]
    since = max(own) if own else now
    if study_state in (StudyState.RECEIVING, StudyState.COMPLETE):
        return Verdict(SpoolState.RECEIVING, since, None)
    open_jobs = [job for job in jobs if job[0] not in TERMINAL_JOB_STATES]
    if any(state is JobState.RUNNING for state, _, _ in open_jobs):
        return Verdict(SpoolState.WAITING, since, None)
    if open_jobs:
        since = max([since] + [as_utc(u) for _, _, u in open_jobs if u is not None])
        due = since + timedelta(seconds=storage.retention_waiting_seconds)
        return Verdict(SpoolState.ELIGIBLE if now >= due else SpoolState.WAITING, since, due)
    since = max([since] + [as_utc(f) for _, f, _ in jobs if f is not None])
    due = since + timedelta(seconds=storage.retention_seconds)
    return Verdict(SpoolState.ELIGIBLE if now >= due else SpoolState.KEPT, since, due)


@dataclass(frozen=True)
class StudySpool:
    """One study that still has files: its verdict and what it holds."""

    study_id: int
    study_instance_uid: str
    verdict: Verdict
    files: int
    bytes: int
    outputs: int

    @property
    def state(self) -> SpoolState:
        """The study's retention state."""
        return self.verdict.state


@dataclass(frozen=True)
class SpoolStatus:
    """Every study with files in the spool, and the free space (``sijnode spool status``)."""

    studies: list[StudySpool]
    free_bytes: int
    purge_below_free_bytes: int

    def bytes_by_state(self) -> dict[SpoolState, int]:
        """Spool bytes (instances) by retention state."""
        out = dict.fromkeys(SpoolState, 0)
        for item in self.studies:
            out[item.state] += item.bytes
        return out

    def plan(self, until_relieved: bool = True) -> list[tuple[StudySpool, RemovalReason]]:
        """What a sweep would remove now: the eligible ones by due time, then, under disk
        pressure, kept ones (final the longest first) until the free space would suffice
        (``until_relieved``) or all of them (the sweep stops once it does suffice)."""
        due = sorted(
            (s for s in self.studies if s.state is SpoolState.ELIGIBLE),
            key=lambda s: (s.verdict.due_at or s.verdict.since, s.study_id),
        )
        out = [(s, RemovalReason.RETENTION) for s in due]
        free = self.free_bytes + sum(s.bytes for s in due)
        if free < self.purge_below_free_bytes:
            for item in sorted(
                (s for s in self.studies if s.state is SpoolState.KEPT),
                key=lambda s: (s.verdict.since, s.study_id),
            ):
                if until_relieved and free >= self.purge_below_free_bytes:
                    break
                out.append((item, RemovalReason.DISK_PRESSURE))
                free += item.bytes
        return out


@dataclass(frozen=True)
class RemovalResult:
    """What one removal (or all of a study's) did."""

    study_id: int
    reason: RemovalReason
    files: int = 0
    bytes: int = 0
    #: Why nothing was removed: the study's state when the rules refused, or None.
    refused: SpoolState | None = None


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    removed: list[RemovalResult] = field(default_factory=list)
    recovered: int = 0
    #: The budget ran out with work left: the next sweep should run at once.
    more: bool = False
    #: Below the disk-pressure threshold with nothing left that may be removed.
    unrelieved: bool = False

    @property
    def files(self) -> int:
        """Files removed."""
        return sum(r.files for r in self.removed)


class Retention:
    """Applies the retention policy to one spool and its audit (module docstring)."""

    def __init__(
        self,
        storage: StorageSettings,
        sessions: sessionmaker[Session],
        spool: Spool,
        metrics: NodeMetrics | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.storage = storage
        #: Relative ``outputs.path`` values are under the data directory (the worker writes
        #: ``<data_dir>/outputs/<job_key>/``); without one, under the spool directory.
        self.data_dir = data_dir
        self.sessions = sessions
        self.spool = spool
        self.metrics = metrics
        self._pressure_logged = -1e9

    # -- judging ------------------------------------------------------------------------

    def status(self, now: datetime | None = None) -> SpoolStatus:
        """Every study that still has files, judged at ``now``."""
        now = now or utcnow()
        with transaction(self.sessions) as session:
            files = {
                study_id: (int(n), int(size))
                for study_id, n, size in session.execute(
                    select(
                        Instance.study_id,
                        func.count(Instance.id),
                        func.coalesce(func.sum(Instance.size_bytes), 0),
                    )
                    .where(Instance.removed_at.is_(None))
                    .group_by(Instance.study_id)
                )
            }
            outputs = {
                study_id: int(n)
                for study_id, n in session.execute(
                    select(Job.study_id, func.count(Output.id))
                    .join(Output, Output.job_id == Job.id)
                    .where(Output.removed_at.is_(None), Output.path.is_not(None))
                    .group_by(Job.study_id)
                )
            }
            ids = sorted(set(files) | set(outputs))
            studies: list[StudySpool] = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                jobs: dict[int, list[tuple[JobState, datetime | None, datetime | None]]] = {}
                for study_id, job_state, finished, updated in session.execute(
                    select(Job.study_id, Job.state, Job.finished_at, Job.updated_at).where(
                        Job.study_id.in_(chunk)
                    )
                ):
                    jobs.setdefault(study_id, []).append((JobState(job_state), finished, updated))
                for study_id, uid, state, completed, last in session.execute(
                    select(
                        Study.id,
                        Study.study_instance_uid,
                        Study.state,
                        Study.completed_at,
                        Study.last_received_at,
                    ).where(Study.id.in_(chunk))
                ):
                    verdict = judge(
                        StudyState(state),
                        (completed, last),
                        jobs.get(study_id, []),
                        now,
                        self.storage,
                    )
                    n, size = files.get(study_id, (0, 0))
                    studies.append(
                        StudySpool(study_id, uid, verdict, n, size, outputs.get(study_id, 0))
                    )
        return SpoolStatus(studies, self.spool.free_bytes(), self.storage.purge_below_free_bytes)

    def _judge_locked(self, session: Session, study: Study, now: datetime) -> Verdict:
        jobs = [
            (JobState(state), finished, updated)
            for state, finished, updated in session.execute(
                select(Job.state, Job.finished_at, Job.updated_at).where(Job.study_id == study.id)
            )
        ]
        return judge(
            StudyState(study.state),
            (study.completed_at, study.last_received_at),
            jobs,
            now,
            self.storage,
        )

    # -- removing -----------------------------------------------------------------------

    def remove_study(
        self,
        study_id: int,
        reason: RemovalReason,
        max_files: int | None = None,
        now: datetime | None = None,
    ) -> RemovalResult:
        """Remove the files of one study, if the rules allow it for ``reason``.

        Runs removals of at most :data:`FILES_PER_REMOVAL` files until the study has no
        files left or ``max_files`` were removed. Raises AuditError when the audit cannot
        be written (nothing is then removed by the failed step).
        """
        budget = max_files if max_files is not None else self.storage.sweep_max_files
        files = size = 0
        while budget > 0:
            step = self._remove_some(study_id, reason, min(budget, FILES_PER_REMOVAL), now)
            if step.refused is not None:
                if files:
                    break
                return step
            if step.files == 0:
                break
            files += step.files
            size += step.bytes
            budget -= step.files
        return RemovalResult(study_id, reason, files, size)

    def _remove_some(
        self, study_id: int, reason: RemovalReason, limit: int, now: datetime | None
    ) -> RemovalResult:
        when = now or utcnow()
        with transaction(self.sessions) as session:
            # 1. intent (PostgreSQL: locked, so the judgement holds until the commit)
            study = session.get_one(Study, study_id, with_for_update=True)
            verdict = self._judge_locked(session, study, when)
            if verdict.state not in _REMOVABLE[reason]:
                return RemovalResult(study_id, reason, refused=verdict.state)
            instance_ids = list(
                session.scalars(
                    select(Instance.id)
                    .where(Instance.study_id == study_id, Instance.removed_at.is_(None))
                    .order_by(Instance.id)
                    .limit(limit)
                )
            )
            output_ids = list(
                session.scalars(
                    select(Output.id)
                    .join(Job, Job.id == Output.job_id)
                    .where(
                        Job.study_id == study_id,
                        Output.removed_at.is_(None),
                        Output.path.is_not(None),
                    )
                    .order_by(Output.id)
                    .limit(max(0, limit - len(instance_ids)))
                )
            )
            if not instance_ids and not output_ids:
                return RemovalResult(study_id, reason)
            intent = SpoolRemoval(
                study_id=study_id,
                generation=study.generation,
                reason=reason.value,
                status=RemovalStatus.PENDING.value,
                instance_ids=instance_ids,
                output_ids=output_ids,
                files=0,
                bytes=0,
                created_at=when,
            )
            session.add(intent)
            session.flush()
            intent_id = intent.id
        result = self._carry_out(intent_id, recovering=False, now=now)
        return result or RemovalResult(study_id, reason)

    def _carry_out(
        self, intent_id: int, *, recovering: bool, now: datetime | None = None
    ) -> RemovalResult | None:
        """Steps 2 and 3 of a removal, or its recovery (no unlink: only what is gone)."""
        with transaction(self.sessions) as session:
            when = now or utcnow()
            # the claim is the first write: the write lock (SQLite) or the row lock
            claimed = (
                session.connection()
                .execute(
                    update(SpoolRemoval)
                    .where(
                        SpoolRemoval.id == intent_id,
                        SpoolRemoval.status == RemovalStatus.PENDING.value,
                    )
                    .values(finished_at=when)
                )
                .rowcount
            )
            if claimed != 1:
                return None  # done meanwhile by another process
            intent = session.get_one(SpoolRemoval, intent_id)
            reason = RemovalReason(intent.reason)
            study = session.get_one(Study, intent.study_id, with_for_update=True)
            if not recovering:
                verdict = self._judge_locked(session, study, when)
                if study.generation != intent.generation or verdict.state not in _REMOVABLE[reason]:
                    intent.status = RemovalStatus.ROLLED_BACK.value
                    log.info(
                        "spool removal rolled back: the study changed",
                        extra=fields(
                            study_id=study.id, removal_id=intent_id, state=verdict.state.value
                        ),
                    )
                    return RemovalResult(study.id, reason, refused=verdict.state)
            files, size, outputs = self._unlink(session, intent, reason, when, recovering)
            intent.files = files + outputs
            intent.bytes = size
            if recovering and not files + outputs:
                intent.status = RemovalStatus.ROLLED_BACK.value
            else:
                intent.status = RemovalStatus.DONE.value
                event = record_event(
                    session,
                    EventType.SPOOL_PURGED,
                    study_id=study.id,
                    reason=reason.value,
                    instances=files,
                    outputs=outputs,
                    bytes=size,
                    removal_id=intent_id,
                    recovered=recovering,
                )
                event.at = when
        if files + outputs:
            log.info(
                "spool files removed",
                extra=fields(
                    study_id=study.id,
                    removal_id=intent_id,
                    reason=reason.value,
                    instances=files,
                    outputs=outputs,
                    bytes=size,
                    recovered=recovering,
                ),
            )
            if self.metrics is not None:
                self.metrics.spool_files_removed.labels(reason=reason.value).inc(files + outputs)
                self.metrics.spool_bytes_removed.labels(reason=reason.value).inc(size)
        return RemovalResult(study.id, reason, files + outputs, size)

    def _unlink(
        self,
        session: Session,
        intent: SpoolRemoval,
        reason: RemovalReason,
        when: datetime,
        recovering: bool,
    ) -> tuple[int, int, int]:
        """Unlink the intent's files (not when recovering), fsync their directories, and
        mark the rows whose file is gone. Returns (instances, bytes, outputs)."""
        instances = self._rows(session, Instance, intent.instance_ids)
        output_rows = self._rows(session, Output, intent.output_ids)
        directories: set[Path] = set()
        gone: list[tuple[Any, int]] = []
        for row in instances:
            path = self.spool.path(row.spool_path)
            if self._unlinked(path, recovering):
                directories.add(path.parent)
                gone.append((row, int(row.size_bytes)))
        n_instances = len(gone)
        for out in output_rows:
            path = self.output_path(str(out.path))
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
            if self._unlinked(path, recovering):
                directories.add(path.parent)
                gone.append((out, size))
        self._sync(directories)
        for row, _ in gone:
            row.removed_at = when
            row.removed_reason = reason.value
        return n_instances, sum(size for _, size in gone), len(gone) - n_instances

    @staticmethod
    def _rows(session: Session, model: Any, ids: list[int]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(ids), _CHUNK):
            out += session.scalars(
                select(model).where(
                    model.id.in_(ids[start : start + _CHUNK]), model.removed_at.is_(None)
                )
            ).all()
        return out

    @staticmethod
    def _unlinked(path: Path, recovering: bool) -> bool:
        """Whether ``path`` is gone (unlinked now unless recovering)."""
        if not recovering:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.error(
                    "spool file could not be removed; kept",
                    extra=fields(error=exc.strerror, errno=exc.errno),
                )
        return not path.exists()

    def _sync(self, directories: set[Path]) -> None:
        """fsync the directories of removed files (so the unlinks are durable before the
        rows say so) and drop the series and study directories left empty."""
        parents: set[Path] = set()
        for directory in directories:
            parents.add(directory.parent)
            self._fsync_or_drop(directory)
        for parent in parents:
            self._fsync_or_drop(parent)
        if parents:
            self.spool.sync_directory(self.spool.root)

    def _fsync_or_drop(self, directory: Path) -> None:
        root = self.spool.root
        if directory != root and directory.is_relative_to(root) and directory.name != ".tmp":
            try:
                directory.rmdir()  # only when empty
                return
            except OSError:
                pass
        if directory.exists():
            self.spool.sync_directory(directory)

    def output_path(self, path: str) -> Path:
        """Where an output file is: ``outputs.path``, relative to the data directory."""
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        return (self.data_dir if self.data_dir is not None else self.spool.root) / candidate

    # -- recovery -----------------------------------------------------------------------

    def recover(self, older_than: float = 0.0) -> int:
        """Close the pending intents of a process that died mid-removal; return how many.

        Only the rows whose file no longer exists are marked removed (module docstring).
        """
        cutoff = utcnow() - timedelta(seconds=older_than)
        with transaction(self.sessions) as session:
            pending = list(
                session.scalars(
                    select(SpoolRemoval.id)
                    .where(
                        SpoolRemoval.status == RemovalStatus.PENDING.value,
                        SpoolRemoval.created_at <= cutoff,
                    )
                    .order_by(SpoolRemoval.id)
                )
            )
        closed = 0
        for intent_id in pending:
            if self._carry_out(intent_id, recovering=True) is not None:
                closed += 1
        if closed:
            log.warning("closed spool removals left pending", extra=fields(count=closed))
        return closed

    # -- the sweep ----------------------------------------------------------------------

    def sweep(self, now: datetime | None = None) -> SweepReport:
        """One pass: recover stale intents, remove what is due, relieve disk pressure."""
        recovered = self.recover(STALE_INTENT_SECONDS)
        status = self.status(now)
        self._observe(status)
        budget = self.storage.sweep_max_files
        removed: list[RemovalResult] = []
        threshold = status.purge_below_free_bytes
        for item, reason in status.plan(until_relieved=False):
            if budget <= 0:
                break
            if reason is RemovalReason.DISK_PRESSURE and self.spool.free_bytes() >= threshold:
                break
            result = self.remove_study(item.study_id, reason, budget, now)
            if result.files:
                removed.append(result)
                budget -= result.files
        more = budget <= 0
        free = self.spool.free_bytes()
        unrelieved = free < threshold and not more
        if self.metrics is not None:
            self.metrics.spool_free_bytes.set(free)
            self.metrics.spool_pressure_unrelieved.set(1 if unrelieved else 0)
        if unrelieved and time.monotonic() - self._pressure_logged >= _PRESSURE_LOG_SECONDS:
            self._pressure_logged = time.monotonic()
            log.warning(
                "disk pressure: nothing left that may be removed; instances are refused "
                "(0xA700) below storage.min_free_mb",
                extra=fields(
                    free_mb=free // 2**20,
                    purge_below_free_mb=threshold // 2**20,
                    min_free_mb=self.storage.min_free_mb,
                ),
            )
        if removed:
            self._observe(self.status(now))
        return SweepReport(removed, recovered, more, unrelieved)

    def _observe(self, status: SpoolStatus) -> None:
        if self.metrics is None:
            return
        for state, size in status.bytes_by_state().items():
            self.metrics.spool_bytes.labels(state=state.value).set(size)
        self.metrics.spool_free_bytes.set(status.free_bytes)


def run_forever(retention: Retention, interval: float, stop: threading.Event) -> None:
    """The sweeper thread: a sweep every ``interval`` seconds (at once while work is left)."""
    while not stop.wait(interval):
        while not stop.is_set():
            try:
                report = retention.sweep()
            except (SijnodeError, OSError) as exc:
                log.error("spool sweep failed; retrying", extra=fields(error=str(exc)))
                break
            if not report.more:
                break
