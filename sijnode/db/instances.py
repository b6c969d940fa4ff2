"""Studies, series and instances in the audit: the rows the listener writes and jobs read.

:class:`InstanceRecorder` writes the rows of one received instance inside the caller's
transaction (the listener's ordering of seal, record, place, sync and commit stays in
:mod:`sijnode.daemon.ingest`). It holds the prepared statements of the hot path
(:mod:`sijnode.db.prepared`), the UID → row id caches, the get-or-create of study and
series rows, and the reopen rule. What one transaction learned is kept in a
:class:`PendingRows` of that call and reaches the shared caches only after the commit.

A series belongs to exactly one study: series are keyed by (StudyInstanceUID,
SeriesInstanceUID). A second study that reuses a series UID gets a series row of its own
and a ``series_uid_reused`` event; a SOP Instance UID seen again with other bytes (in any
study) is a conflict, both copies kept (docs/receiving.md).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable

from sqlalchemy import Connection, Integer, bindparam, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from sijnode.db.engine import record_event
from sijnode.db.lifecycle import transition
from sijnode.db.prepared import PreparedStatement, run_pipelined
from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.reid import remember_identifiers
from sijnode.db.schema import (
    Event,
    EventType,
    Instance,
    Job,
    Series,
    Study,
    StudyState,
    utcnow,
)
from sijnode.errors import MixedInputsError, SijnodeError
from sijnode.logs import fields
from sijnode.settings import DatabaseSettings

log = logging.getLogger(__name__)


@runtime_checkable
class InstanceKeysLike(Protocol):
    """What every instance row needs (read by ``sijnode.daemon.keys``)."""

    @property
    def study_instance_uid(self) -> str: ...
    @property
    def series_instance_uid(self) -> str: ...
    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def sop_class_uid(self) -> str: ...
    @property
    def transfer_syntax_uid(self) -> str: ...
    @property
    def instance_number(self) -> int | None: ...
    @property
    def slice_position(self) -> float | None: ...
    @property
    def images_in_acquisition(self) -> int | None: ...
    @property
    def series_related_instances(self) -> int | None: ...


@runtime_checkable
class InstanceHeaderLike(InstanceKeysLike, Protocol):
    """Also what a new study or series row needs (read by ``sijnode.daemon.header``)."""

    @property
    def modality(self) -> str | None: ...
    @property
    def body_part_examined(self) -> str | None: ...
    @property
    def series_description(self) -> str | None: ...
    @property
    def series_number(self) -> int | None: ...
    @property
    def manufacturer(self) -> str | None: ...
    @property
    def manufacturer_model_name(self) -> str | None: ...
    @property
    def station_name(self) -> str | None: ...
    @property
    def image_type(self) -> str | None: ...
    @property
    def orientation(self) -> str | None: ...
    @property
    def study_date(self) -> str | None: ...
    @property
    def patient_id(self) -> str | None: ...
    @property
    def accession_number(self) -> str | None: ...


#: Spool path of an instance from (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
#: SHA-256): ``sijnode.daemon.spool.Spool.relpath_for``.
RelpathFor = Callable[[str, str, str, str], str]

# Statements of the per-instance hot path, built once (PS: SQLAlchemy caches compiled forms,
# but building the expression each time costs more than executing it on SQLite).
_SAME_UID = select(
    Instance.id, Instance.sha256, Instance.study_id, Instance.spool_path, Instance.removed_at
).where(Instance.sop_instance_uid == bindparam("b_uid"))
_TOUCH_STUDY = (
    update(Study)
    .where(
        Study.id == bindparam("b_id"),
        Study.state == StudyState.RECEIVING,
        Study.generation == bindparam("b_generation"),
    )
    .values(last_received_at=bindparam("b_now"))
)
_TOUCH_SERIES = (
    update(Series)
    .where(Series.id == bindparam("b_id"))
    .values(
        last_received_at=bindparam("b_now"),
        # NULL (no count announced) compares unknown and keeps the stored value
        expected_instances=case(
            (
                func.coalesce(Series.expected_instances, 0)
                < bindparam("b_expected", type_=Integer),
                bindparam("b_expected", type_=Integer),
            ),
            else_=Series.expected_instances,
        ),
    )
)
_INSERT_INSTANCE = insert(Instance).returning(Instance.id)
_INSERT_EVENT = insert(Event)
_INSTANCE_COLUMNS = (
    "series_id",
    "study_id",
    "association_id",
    "sop_instance_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "size_bytes",
    "sha256",
    "spool_path",
    "instance_number",
    "slice_position",
    "conflict",
    "received_at",
    "generation",
)
_EVENT_COLUMNS = ("type", "study_id", "association_id", "detail", "at")


def _insert_new_instance(dialect: Dialect) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id, for SQLite and PostgreSQL."""
    if dialect.name == "postgresql":
        return postgresql_insert(Instance).on_conflict_do_nothing().returning(Instance.id)
    return sqlite_insert(Instance).on_conflict_do_nothing().returning(Instance.id)


class _HotPath:
    """The per-instance statements, prepared for one dialect (see sijnode.db.prepared)."""

    def __init__(self, dialect: Dialect) -> None:
        self.same_uid = PreparedStatement(_SAME_UID, dialect)
        self.touch_study = PreparedStatement(_TOUCH_STUDY, dialect)
        self.touch_series = PreparedStatement(_TOUCH_SERIES, dialect)
        self.insert_instance = PreparedStatement(_INSERT_INSTANCE, dialect, _INSTANCE_COLUMNS)
        # the optimistic INSERT of _record_fast: a copy already there inserts nothing
        self.insert_new_instance = PreparedStatement(
            _insert_new_instance(dialect), dialect, _INSTANCE_COLUMNS
        )
        self.insert_event = PreparedStatement(_INSERT_EVENT, dialect, _EVENT_COLUMNS)


_CACHE_SIZE = 4096
_SERIES_TOUCH_SECONDS = 1.0


class _SameUID(NamedTuple):
    id: int
    sha256: str
    study_id: int
    spool_path: str
    removed_at: datetime | None


def _instance_row(
    header: InstanceKeysLike,
    series_id: int,
    study_id: int,
    association_id: int | None,
    size: int,
    sha: str,
    relpath: str,
    conflict: bool,
    now: datetime,
    generation: int,
) -> dict[str, Any]:
    """The parameters of the instance row's INSERT (:data:`_INSTANCE_COLUMNS`)."""
    return {
        "series_id": series_id,
        "study_id": study_id,
        "association_id": association_id,
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "size_bytes": size,
        "sha256": sha,
        "spool_path": relpath,
        "instance_number": header.instance_number,
        "slice_position": header.slice_position,
        "conflict": conflict,
        "received_at": now,
        "generation": generation,
    }


def _expected(header: InstanceKeysLike) -> int | None:
    """The series size the instance announces (ImagesInAcquisition, else the series')."""
    return header.images_in_acquisition or header.series_related_instances


class NeedHeader(SijnodeError):
    """Only the keys were read, but a study or series row must be created: read it all.

    The transaction must be rolled back and :meth:`InstanceRecorder.record` called again
    with the whole header and a new :class:`PendingRows`.
    """


class IngestOutcome(StrEnum):
    """What happened to one received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class IngestResult:
    """The outcome and the rows involved (ids only: sessions are closed)."""

    outcome: IngestOutcome
    study_id: int
    instance_id: int
    relpath: str
    #: Only a new instance row of a known, receiving series was written (the hot path):
    #: deleting that row undoes the whole transaction (sijnode.daemon.ingest).
    fresh: bool = False


#: Key of a cached series row: a series UID means something only within its study.
SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


@dataclass
class PendingRows:
    """What one transaction learned for the caches; applied once it has committed."""

    entries: list[tuple[OrderedDict[Any, Any], Any, Any]] = field(default_factory=list)


class InstanceRecorder:
    """Writes the rows of received instances; one per node, shared by association threads.

    Not thread-safe by itself: the caller serialises :meth:`record` and :meth:`remember`
    (one writer at a time keeps get-or-create simple; SQLite serialises writers anyway).
    """

    def __init__(self, audit: DatabaseSettings, site: str, relpath_for: RelpathFor) -> None:
        self.audit = audit
        self.secret = audit.pseudonym_secret
        self.site = site
        self.relpath_for = relpath_for
        # UID → row id caches for the hot path; rows are never deleted, so an id stays valid.
        self._studies: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._series_ids: OrderedDict[SeriesKey, int] = OrderedDict()
        # series id → (monotonic time of the last UPDATE, expected count written then)
        self._series_touched: OrderedDict[int, tuple[float, int | None]] = OrderedDict()
        self._prepared: dict[str, _HotPath] = {}

    def knows(self, study_instance_uid: str, series_instance_uid: str) -> bool:
        """Whether the study and its series have rows already (the keys then suffice)."""
        return (
            study_instance_uid in self._studies
            and (study_instance_uid, series_instance_uid) in self._series_ids
        )

    def remember(self, pending: PendingRows) -> None:
        """Apply what a committed transaction learned to the shared caches."""
        for cache, key, value in pending.entries:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > _CACHE_SIZE:
                cache.popitem(last=False)

    @staticmethod
    def find_duplicate(session: Session, sop_uid: str, sha: str) -> Instance | None:
        """The row of an identical copy (same SOP Instance UID, same bytes), if any."""
        return session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_uid, Instance.sha256 == sha)
        ).first()

    @staticmethod
    def owner_of(session: Session, relpath: str) -> int | None:
        """The id of the instance row that owns spool file ``relpath``, if any."""
        return session.scalar(select(Instance.id).where(Instance.spool_path == relpath))

    def record(
        self,
        session: Session,
        pending: PendingRows,
        header: InstanceKeysLike,
        digest: Callable[[], str],
        size: int,
        relpath: str | None,
        association_id: int | None,
        calling_ae_title: str | None,
        now: datetime,
        fast: bool = True,
    ) -> IngestResult:
        """Write the instance's rows in ``session`` (prepared statements on the hot path).

        ``digest`` gives the content hash; it is asked for only once the rows that do not
        need it are written, so a helper can hash meanwhile. ``relpath`` is derived from
        the UIDs and the hash unless given (a file already in the spool). Raises
        :class:`NeedHeader` when ``header`` holds only the keys and a row must be created.
        ``fast=False`` skips the one-round-trip attempt (:meth:`record_fresh` just failed).
        """
        if fast:
            quick = self._record_fast(session, header, digest, size, relpath, association_id, now)
            if quick is not None:
                return quick
        conn = session.connection()
        hot = self._hot_path(conn)
        # The study first: its row lock (PostgreSQL) or the write lock (SQLite) orders this
        # after a retention removal of the study's files in progress, whose removed_at the
        # lookup below then sees (sijnode.daemon.retention).
        study_id, generation = self._touch_study(session, pending, header, calling_ae_title, now)
        same_uid = [
            _SameUID(*row)
            for row in hot.same_uid.execute(conn, {"b_uid": header.sop_instance_uid}).fetchall()
        ]
        sha = digest()
        duplicate = next((row for row in same_uid if row.sha256 == sha), None)
        if duplicate is not None and duplicate.removed_at is not None:
            # Its file was removed by retention: this copy is stored again, in the same
            # row (the spool path is the same), and the removal stays in the events.
            return self._restore(session, duplicate, study_id, association_id)
        if duplicate is not None:
            # A re-send touches the study (above), so it is judged again and, if it was
            # already dispatched, its identical job key is recorded as a duplicate job.
            # (Identical bytes carry the same StudyInstanceUID: a duplicate is never of
            # another study.)
            self._event(
                session,
                EventType.INSTANCE_DUPLICATE,
                study_id,
                association_id,
                {"sop_instance_uid": header.sop_instance_uid},
            )
            return IngestResult(
                IngestOutcome.DUPLICATE, study_id, duplicate.id, duplicate.spool_path
            )
        series_id = self._touch_series(session, pending, study_id, header, now)
        conflict = bool(same_uid)
        if relpath is None:
            relpath = self.relpath_for(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                sha,
            )
        instance_id = hot.insert_instance.execute(
            conn,
            _instance_row(
                header,
                series_id,
                study_id,
                association_id,
                size,
                sha,
                relpath,
                conflict,
                now,
                generation,
            ),
        ).fetchone()[0]
        if conflict:
            conn.execute(
                update(Instance)
                .where(Instance.id.in_([row.id for row in same_uid]))
                .values(conflict=True)
            )
            other_studies = sorted({row.study_id for row in same_uid} - {study_id})
            log.warning(
                "instance conflict: same SOP Instance UID, different bytes; both kept",
                extra=fields(
                    sop_instance_uid=header.sop_instance_uid,
                    sha256=sha,
                    study_id=study_id,
                    other_studies=other_studies,
                ),
            )
            # The instance row is the record of a stored instance; events mark exceptions.
            detail: dict[str, object] = {
                "sop_instance_uid": header.sop_instance_uid,
                "sha256": sha,
                "size": size,
            }
            if other_studies:
                detail["other_studies"] = other_studies
            self._event(session, EventType.INSTANCE_CONFLICT, study_id, association_id, detail)
        outcome = IngestOutcome.CONFLICT if conflict else IngestOutcome.STORED
        return IngestResult(outcome, study_id, instance_id, relpath)

    def record_fresh(
        self,
        session: Session,
        header: InstanceKeysLike,
        digest: Callable[[], str],
        size: int,
        association_id: int | None,
        now: datetime,
    ) -> IngestResult | None:
        """Only the hot path: a new instance of a known, receiving series, else None.

        Nothing else is written, so the caller may commit it in a session of its own
        (:func:`sijnode.db.engine.fresh_row_sessions`); on None the session is rolled back.
        """
        return self._record_fast(session, header, digest, size, None, association_id, now)

    def _record_fast(
        self,
        session: Session,
        header: InstanceKeysLike,
        digest: Callable[[], str],
        size: int,
        relpath: str | None,
        association_id: int | None,
        now: datetime,
    ) -> IngestResult | None:
        """The usual case in one round trip: a new instance of a known, receiving series.

        The SOP Instance UID lookup, the study's touch and the instance row go out
        together (:func:`~sijnode.db.prepared.run_pipelined`); if the UID was already
        there or the study no longer receives, the transaction is rolled back and None
        returned, and :meth:`record` takes the long way.
        """
        study = self._studies.get(header.study_instance_uid)
        series_id = self._series_ids.get((header.study_instance_uid, header.series_instance_uid))
        if study is None or series_id is None or self._series_due(series_id, _expected(header)):
            return None
        study_id, generation = study
        sha = digest()
        if relpath is None:
            relpath = self.relpath_for(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                sha,
            )
        conn = session.connection()
        hot = self._hot_path(conn)
        same, touched, inserted = run_pipelined(
            conn,
            [
                (hot.same_uid, {"b_uid": header.sop_instance_uid}),
                (hot.touch_study, {"b_id": study_id, "b_generation": generation, "b_now": now}),
                (
                    hot.insert_new_instance,
                    _instance_row(
                        header,
                        series_id,
                        study_id,
                        association_id,
                        size,
                        sha,
                        relpath,
                        False,
                        now,
                        generation,
                    ),
                ),
            ],
        )
        row = inserted.fetchone()
        if same.fetchall() or touched.rowcount != 1 or row is None:
            session.rollback()
            return None
        return IngestResult(IngestOutcome.STORED, study_id, row[0], relpath, fresh=True)

    @staticmethod
    def _restore(
        session: Session, row: _SameUID, study_id: int, association_id: int | None
    ) -> IngestResult:
        """A re-sent instance whose file retention removed: the row holds the file again."""
        conn = session.connection()
        previous = conn.execute(
            select(Instance.removed_at, Instance.removed_reason).where(Instance.id == row.id)
        ).one()
        conn.execute(
            update(Instance)
            .where(Instance.id == row.id)
            .values(removed_at=None, removed_reason=None)
        )
        record_event(
            session,
            EventType.INSTANCE_RESTORED,
            study_id=study_id,
            association_id=association_id,
            instance_id=row.id,
            removed_at=previous.removed_at.isoformat(),
            removed_reason=previous.removed_reason,
        )
        return IngestResult(IngestOutcome.STORED, study_id, row.id, row.spool_path)

    def _series_due(self, series_id: int, expected: int | None) -> bool:
        """Whether the series row needs its UPDATE now (see :meth:`_touch_series`)."""
        touched_at, known = self._series_touched.get(series_id, (-1e9, None))
        if time.monotonic() - touched_at >= _SERIES_TOUCH_SECONDS:
            return True
        return expected is not None and (known is None or expected > known)

    def _hot_path(self, conn: Connection) -> _HotPath:
        hot = self._prepared.get(conn.dialect.name)
        if hot is None:
            hot = self._prepared[conn.dialect.name] = _HotPath(conn.dialect)
        return hot

    def _event(
        self,
        session: Session,
        type_: EventType,
        study_id: int,
        association_id: int | None,
        detail: dict[str, object],
    ) -> None:
        conn = session.connection()
        self._hot_path(conn).insert_event.execute(
            conn,
            {
                "type": type_,
                "study_id": study_id,
                "association_id": association_id,
                "detail": detail,
                "at": utcnow(),
            },
        )

    def _touch_study(
        self,
        session: Session,
        pending: PendingRows,
        header: InstanceKeysLike,
        calling_ae_title: str | None,
        now: datetime,
    ) -> tuple[int, int]:
        """Study id and generation; a cheap conditional UPDATE while it is receiving."""
        cached = self._studies.get(header.study_instance_uid)
        if cached is not None:
            study_id, generation = cached
            conn = session.connection()
            touched = self._hot_path(conn).touch_study.execute(
                conn, {"b_id": study_id, "b_generation": generation, "b_now": now}
            )
            if touched.rowcount == 1:
                return study_id, generation
        study = self._study(session, header, calling_ae_title, now)
        pending.entries.append(
            (self._studies, header.study_instance_uid, (study.id, study.generation))
        )
        return study.id, study.generation

    def _touch_series(
        self,
        session: Session,
        pending: PendingRows,
        study_id: int,
        header: InstanceKeysLike,
        now: datetime,
    ) -> int:
        expected = _expected(header)
        key = (header.study_instance_uid, header.series_instance_uid)
        series_id = self._series_ids.get(key)
        if series_id is not None:
            # Nothing decides on a series' last_received_at (the study's times the quiet
            # rule), so it is refreshed once a second, and the expected count when it grows.
            known = self._series_touched.get(series_id, (0.0, None))[1]
            if not self._series_due(series_id, expected):
                return series_id
            conn = session.connection()
            touched = self._hot_path(conn).touch_series.execute(
                conn, {"b_id": series_id, "b_now": now, "b_expected": expected}
            )
            if touched.rowcount == 1:
                written = max(expected or 0, known or 0) or None
                pending.entries.append(
                    (self._series_touched, series_id, (time.monotonic(), written))
                )
                return series_id
        series = self._series(session, study_id, header, now)
        pending.entries.append((self._series_ids, key, series.id))
        # its times and count were just written: the next instance can take the fast path
        pending.entries.append(
            (self._series_touched, series.id, (time.monotonic(), series.expected_instances))
        )
        return series.id

    def _study(
        self,
        session: Session,
        header: InstanceKeysLike,
        calling_ae_title: str | None,
        now: datetime,
    ) -> Study:
        """Get or create the study row; a late instance reopens a study that was judged."""
        study = session.scalars(
            select(Study)
            .where(Study.study_instance_uid == header.study_instance_uid)
            .with_for_update()  # PostgreSQL: the state read is the one the move starts from
        ).first()
        if study is None:
            if not isinstance(header, InstanceHeaderLike):
                raise NeedHeader("a new study")
            study = Study(
                study_instance_uid=header.study_instance_uid,
                patient_pseudonym=patient_pseudonym(header.patient_id, self.secret),
                accession_pseudonym=accession_pseudonym(header.accession_number, self.secret),
                study_date=header.study_date,
                site=self.site,
                first_received_at=now,
                last_received_at=now,
                calling_ae_title=calling_ae_title,
            )
            session.add(study)
            transition(session, study, StudyState.RECEIVING, at=now)
            # off by default: writes nothing unless database.allow_reidentification is on
            remember_identifiers(session, self.audit, header.patient_id, header.accession_number)
            return study
        if study.state != StudyState.RECEIVING:
            # The reopen rule: a late instance has the study assembled again and re-run
            # after the quiet period; the new job supersedes the earlier one
            # (docs/study-completion.md, "Late instances").
            transition(session, study, StudyState.RECEIVING, "late instance", at=now)
        study.last_received_at = now
        return study

    def _series(
        self,
        session: Session,
        study_id: int,
        header: InstanceKeysLike,
        now: datetime,
    ) -> Series:
        """Get or create the series row of ``study_id`` with the header's series UID."""
        same_uid = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).all()
        series = next((row for row in same_uid if row.study_id == study_id), None)
        expected = _expected(header)
        if series is None:
            if not isinstance(header, InstanceHeaderLike):
                raise NeedHeader("a new series")
            series = Series(
                study_id=study_id,
                series_instance_uid=header.series_instance_uid,
                modality=header.modality,
                body_part_examined=header.body_part_examined,
                series_description=header.series_description,
                series_number=header.series_number,
                manufacturer=header.manufacturer,
                manufacturer_model_name=header.manufacturer_model_name,
                station_name=header.station_name,
                image_type=header.image_type,
                orientation=header.orientation,
                expected_instances=expected,
                first_received_at=now,
                last_received_at=now,
            )
            session.add(series)
            session.flush()
            if same_uid:
                self._series_reused(session, series, [row.study_id for row in same_uid])
            return series
        if expected is not None and (series.expected_instances or 0) < expected:
            series.expected_instances = expected
        series.last_received_at = now
        return series

    @staticmethod
    def _series_reused(session: Session, series: Series, other_studies: list[int]) -> None:
        """A series UID already used by other studies: a series of its own, and an event."""
        others = sorted(set(other_studies))
        record_event(
            session,
            EventType.SERIES_UID_REUSED,
            study_id=series.study_id,
            series_id=series.id,
            series_instance_uid=series.series_instance_uid,
            other_studies=others,
        )
        log.warning(
            "series UID already used by another study: kept as a series of its own study",
            extra=fields(
                study_id=series.study_id,
                series_id=series.id,
                series_instance_uid=series.series_instance_uid,
                other_studies=others,
            ),
        )


_CHUNK = 500  # spool paths per IN (...) list


def check_job_inputs(session: Session, job: Job) -> None:
    """Raise MixedInputsError unless every input of ``job`` is an instance of its study.

    Each spool path the job will read must have an instance row whose study, and whose
    series' study, is the job's own, and those studies must carry one patient pseudonym.
    Run when dispatch creates the job and again by the worker before the pipeline starts.
    """
    paths = list(dict.fromkeys(job.spool_paths or []))
    rows: list[tuple[str, int, int, str | None]] = []
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        rows += [
            (path, instance_study, series_study, pseudonym)
            for path, instance_study, series_study, pseudonym in session.execute(
                select(
                    Instance.spool_path,
                    Instance.study_id,
                    Series.study_id,
                    Study.patient_pseudonym,
                )
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.spool_path.in_(chunk))
            )
        ]
    found = {path for path, *_ in rows}
    unknown = [path for path in paths if path not in found]
    if unknown:
        raise MixedInputsError(
            f"job {job.id}: expected an instance row for each of its {len(paths)} inputs, "
            f"got {len(unknown)} without one"
        )
    studies = {study for _, study, _, _ in rows} | {study for _, _, study, _ in rows}
    if studies - {job.study_id}:
        others = sorted(studies - {job.study_id})
        raise MixedInputsError(
            f"job {job.id}: expected every input from study {job.study_id}, "
            f"got instances or series of studies {others}"
        )
    pseudonyms = {pseudonym for *_, pseudonym in rows}
    if len(pseudonyms) > 1:
        raise MixedInputsError(
            f"job {job.id}: expected the inputs of one patient, "
            f"got {len(pseudonyms)} patient pseudonyms"
        )
