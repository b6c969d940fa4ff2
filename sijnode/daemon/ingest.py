"""Store one received instance durably and record it: the work behind a C-STORE.

The data set arrives in a :class:`StagedFile` (written and hashed while its fragments were
on the wire). Order (nothing acknowledged is ever lost): read the header keys while the
file's final fsync runs, write the instance's rows (a new instance of a known series in
one round trip; study and series rows for the first instance), wait for the fsync, rename
the file into place, then fsync its directory while the transaction commits. Only when
both are done does the caller answer Success. A late instance for a study that was already
dispatched reopens it; the rows of a duplicate or a conflict take the long way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, bindparam, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.header import InstanceHeader, read_header
from sijnode.daemon.keys import InstanceKeys, read_keys
from sijnode.daemon.spool import Spool, content_hash
from sijnode.daemon.staging import HEAD_BYTES, StagedFile, adopt_staged, open_staged
from sijnode.db.engine import record_event, transaction
from sijnode.db.prepared import PreparedStatement, run_pipelined
from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.reid import remember_identifiers
from sijnode.db.schema import Event, EventType, Instance, Series, Study, StudyState, utcnow
from sijnode.errors import InvalidInstanceError, SijnodeError
from sijnode.logs import fields
from sijnode.settings import DatabaseSettings

log = logging.getLogger(__name__)

# Statements of the per-instance hot path, built once (PS: SQLAlchemy caches compiled forms,
# but building the expression each time costs more than executing it on SQLite).
_SAME_UID = select(Instance.id, Instance.sha256, Instance.study_id, Instance.spool_path).where(
    Instance.sop_instance_uid == bindparam("b_uid")
)
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


def _instance_row(
    header: InstanceHeader | InstanceKeys,
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


def _expected(header: InstanceHeader | InstanceKeys) -> int | None:
    """The series size the instance announces (ImagesInAcquisition, else the series')."""
    return header.images_in_acquisition or header.series_related_instances


class _NeedHeader(SijnodeError):
    """Only the keys were read, but a study or series row must be created: read it all."""


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


class Ingestor:
    """Stores and records instances; one per node, shared by association threads."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        audit: DatabaseSettings,
        site: str = "default",
        workers: int = 8,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.audit = audit
        self.secret = audit.pseudonym_secret
        self.site = site
        # Study and series rows are get-or-create; one writer at a time keeps that simple
        # and SQLite serialises writers anyway.
        self._lock = threading.Lock()
        # Helpers hash and flush fragments while they arrive, and fsync the finished file.
        self._helpers = ThreadPoolExecutor(workers, thread_name_prefix="sijnode-stage")
        # UID → row id caches for the hot path; rows are never deleted, so an id stays valid.
        self._studies: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._series_ids: OrderedDict[str, int] = OrderedDict()
        # series id → (monotonic time of the last UPDATE, expected count written then)
        self._series_touched: OrderedDict[int, tuple[float, int | None]] = OrderedDict()
        # Cache entries of the transaction in hand; applied only once it has committed.
        self._staged: list[tuple[OrderedDict[Any, Any], Any, Any]] = []
        self._prepared: dict[str, _HotPath] = {}

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

        The rows commit while the renamed file's directory is fsynced, and this returns
        only once the file is durable under its final name and the rows are committed.
        Raises InvalidInstanceError, SpoolError (DiskFullError) or AuditError; on any of
        them nothing was acknowledged, the temporary file is gone and the caller must
        answer with a failure status.
        """
        published: str | None = None
        staged.start_seal()  # the final fsync runs in a helper while the rows are written
        try:
            header = self._read(staged)
            now = received_at or utcnow()
            with self._lock, transaction(self.sessions) as session:

                def record(header: InstanceHeader | InstanceKeys) -> IngestResult:
                    self._staged.clear()
                    return self._record(
                        session,
                        header,
                        staged.digest,
                        staged.size,
                        None,
                        association_id,
                        calling_ae_title,
                        now,
                    )

                try:
                    result = record(header)
                except _NeedHeader:
                    session.rollback()
                    header = self._header(staged)
                    result = record(header)
                staged.seal()  # SpoolError: the transaction rolls back
                relpath = result.relpath
                if result.outcome is IngestOutcome.DUPLICATE or self.spool.path(relpath).exists():
                    staged.discard()
                    session.commit()
                else:
                    staged.close()
                    directory = self.spool.place(staged.path, relpath)
                    published = relpath
                    # the rename is made durable while the rows commit; Success needs both
                    synced = self._helpers.submit(self.spool.sync_directory, directory)
                    try:
                        session.commit()
                    finally:
                        synced.result()
                for cache, key, value in self._staged:
                    self._remember(cache, key, value)
        except BaseException:
            staged.discard()
            self._discard_published(published)
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

    def _read(self, staged: StagedFile) -> InstanceHeader | InstanceKeys:
        """Only the keys when the study and series are known; else the whole header."""
        try:
            uids = read_keys(staged.head)
        except InvalidInstanceError:
            if staged.size <= HEAD_BYTES or staged.error is not None:
                raise
            return self._header(staged)
        if (
            uids.study_instance_uid in self._studies
            and uids.series_instance_uid in self._series_ids
        ):
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
                owned = session.scalar(select(Instance.id).where(Instance.spool_path == published))
        except SijnodeError:
            owned = None  # audit unreachable: the file was not recorded by us
        if owned is None:
            self.spool.path(published).unlink(missing_ok=True)

    def close(self) -> None:
        """Finish pending ingests and stop the helper threads."""
        self._helpers.shutdown(wait=True)

    def record_spooled(self, relpath: str) -> IngestResult | None:
        """Record a spooled file that has no row (a crash between write and commit)."""
        data = self.spool.read(relpath)
        header = read_header(data)
        sha = content_hash(data)
        with self._lock, transaction(self.sessions) as session:
            self._staged.clear()
            if self._find_duplicate(session, header.sop_instance_uid, sha) is not None:
                return None
            return self._record(
                session, header, lambda: sha, len(data), relpath, None, None, utcnow()
            )

    @staticmethod
    def _find_duplicate(session: Session, sop_uid: str, sha: str) -> Instance | None:
        return session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_uid, Instance.sha256 == sha)
        ).first()

    def _record(
        self,
        session: Session,
        header: InstanceHeader | InstanceKeys,
        digest: Callable[[], str],
        size: int,
        relpath: str | None,
        association_id: int | None,
        calling_ae_title: str | None,
        now: datetime,
    ) -> IngestResult:
        """Write the instance's rows in ``session`` (prepared statements on the hot path).

        ``digest`` gives the content hash; it is asked for only once the rows that do not
        need it are written, so a helper can hash meanwhile. ``relpath`` is derived from
        the UIDs and the hash unless given (a file already in the spool).
        """
        fast = self._record_fast(session, header, digest, size, relpath, association_id, now)
        if fast is not None:
            return fast
        conn = session.connection()
        hot = self._hot_path(conn)
        same_uid = [
            _SameUID(*row)
            for row in hot.same_uid.execute(conn, {"b_uid": header.sop_instance_uid}).fetchall()
        ]
        study_id, generation = self._touch_study(session, header, calling_ae_title, now)
        sha = digest()
        duplicate = next((row for row in same_uid if row.sha256 == sha), None)
        if duplicate is not None:
            # A re-send touches the study (above), so it is judged again and, if it was
            # already dispatched, its identical job key is recorded as a duplicate job.
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
        series_id = self._touch_series(session, study_id, header, now)
        conflict = bool(same_uid)
        if relpath is None:
            relpath = self.spool.relpath_for(
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
            log.warning(
                "instance conflict: same SOP Instance UID, different bytes; both kept",
                extra=fields(sop_instance_uid=header.sop_instance_uid, sha256=sha),
            )
            # The instance row is the record of a stored instance; events mark exceptions.
            self._event(
                session,
                EventType.INSTANCE_CONFLICT,
                study_id,
                association_id,
                {"sop_instance_uid": header.sop_instance_uid, "sha256": sha, "size": size},
            )
        outcome = IngestOutcome.CONFLICT if conflict else IngestOutcome.STORED
        return IngestResult(outcome, study_id, instance_id, relpath)

    def _record_fast(
        self,
        session: Session,
        header: InstanceHeader | InstanceKeys,
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
        returned, and :meth:`_record` takes the long way.
        """
        study = self._studies.get(header.study_instance_uid)
        series_id = self._series_ids.get(header.series_instance_uid)
        if study is None or series_id is None or self._series_due(series_id, _expected(header)):
            return None
        study_id, generation = study
        sha = digest()
        if relpath is None:
            relpath = self.spool.relpath_for(
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
        return IngestResult(IngestOutcome.STORED, study_id, row[0], relpath)

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
        header: InstanceHeader | InstanceKeys,
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
        self._staged.append(
            (self._studies, header.study_instance_uid, (study.id, study.generation))
        )
        return study.id, study.generation

    def _touch_series(
        self,
        session: Session,
        study_id: int,
        header: InstanceHeader | InstanceKeys,
        now: datetime,
    ) -> int:
        expected = _expected(header)
        series_id = self._series_ids.get(header.series_instance_uid)
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
                self._staged.append((self._series_touched, series_id, (time.monotonic(), written)))
                return series_id
        series_id = self._series(session, study_id, header, now).id
        self._staged.append((self._series_ids, header.series_instance_uid, series_id))
        return series_id

    @staticmethod
    def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)

    def _study(
        self,
        session: Session,
        header: InstanceHeader | InstanceKeys,
        calling_ae_title: str | None,
        now: datetime,
    ) -> Study:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        ).first()
        if study is None:
            if not isinstance(header, InstanceHeader):
                raise _NeedHeader("a new study")
            study = Study(
                study_instance_uid=header.study_instance_uid,
                patient_pseudonym=patient_pseudonym(header.patient_id, self.secret),
                accession_pseudonym=accession_pseudonym(header.accession_number, self.secret),
                study_date=header.study_date,
                site=self.site,
                state=StudyState.RECEIVING,
                first_received_at=now,
                last_received_at=now,
                calling_ae_title=calling_ae_title,
            )
            session.add(study)
            session.flush()
            # off by default: writes nothing unless database.allow_reidentification is on
            remember_identifiers(session, self.audit, header.patient_id, header.accession_number)
            return study
        if study.state != StudyState.RECEIVING:
            # A late instance: the study is assembled again and re-run after the quiet
            # period; the new job supersedes the earlier one (LANDSCAPE.md, lead 1).
            previous = study.state
            study.state = StudyState.RECEIVING
            study.generation += 1
            study.completed_at = None
            study.completion_reason = None
            study.ignored_reason = None
            record_event(
                session,
                EventType.STUDY_REOPENED,
                study_id=study.id,
                previous_state=previous.value,
                generation=study.generation,
            )
        study.last_received_at = now
        return study

    def _series(
        self,
        session: Session,
        study_id: int,
        header: InstanceHeader | InstanceKeys,
        now: datetime,
    ) -> Series:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).first()
        expected = _expected(header)
        if series is None:
            if not isinstance(header, InstanceHeader):
                raise _NeedHeader("a new series")
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
            return series
        if expected is not None and (series.expected_instances or 0) < expected:
            series.expected_instances = expected
        series.last_received_at = now
        return series
