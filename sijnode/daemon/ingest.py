"""Store one received instance durably and record it: the work behind a C-STORE.

Order (nothing acknowledged is ever lost): parse the header, look for a duplicate, write
the original bytes to the spool (fsync + rename), then record the instance, its series
and study, and the event in one transaction. Only when both succeed does the caller
answer Success. A late instance for a study that was already dispatched reopens it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, bindparam, case, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.header import InstanceHeader, read_header
from sijnode.daemon.spool import Spool, content_hash
from sijnode.db.engine import record_event, transaction
from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.reid import remember_identifiers
from sijnode.db.schema import Event, EventType, Instance, Series, Study, StudyState, utcnow
from sijnode.errors import SijnodeError, SpoolError
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

_CACHE_SIZE = 4096


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
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.audit = audit
        self.secret = audit.pseudonym_secret
        self.site = site
        # Study and series rows are get-or-create; one writer at a time keeps that simple
        # and SQLite serialises writers anyway.
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sijnode-spool")
        # UID → row id caches for the hot path; rows are never deleted, so an id stays valid.
        self._studies: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._series_ids: OrderedDict[str, int] = OrderedDict()
        # Cache entries of the transaction in hand; applied only once it has committed.
        self._staged: list[tuple[OrderedDict[str, Any], str, Any]] = []

    def ingest(
        self,
        data: bytes,
        association_id: int | None = None,
        calling_ae_title: str | None = None,
        received_at: datetime | None = None,
    ) -> IngestResult:
        """Store and record ``data`` (an encoded instance with file meta).

        The spool write runs in a helper thread while the audit rows are written; the
        transaction commits only after the file is durable under its final name. Raises
        InvalidInstanceError, SpoolError (DiskFullError) or AuditError; on any of them
        nothing was acknowledged and the caller must answer with a failure status.
        """
        # The temporary file is written and fsynced while the header is parsed, hashed
        # and recorded; only the rename and the directory fsync wait for all of that.
        staged = self._writer.submit(self.spool.stage, data)
        published = False
        try:
            header = read_header(data)
            sha = content_hash(data)
            relpath = self.spool.relpath_for(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                sha,
            )
            now = received_at or utcnow()
            with self._lock, transaction(self.sessions) as session:
                self._staged.clear()
                result = self._record(
                    session, header, sha, len(data), relpath, association_id, calling_ae_title, now
                )
                if result.outcome is IngestOutcome.DUPLICATE:
                    # already stored: a re-send succeeds even if staging failed (disk full)
                    with contextlib.suppress(SpoolError):
                        self.spool.discard(staged.result())
                else:
                    tmp = staged.result()  # SpoolError: the transaction rolls back
                    if self.spool.path(relpath).exists():
                        self.spool.discard(tmp)
                    else:
                        self.spool.publish(tmp, relpath)
                        published = True
                session.commit()
                for cache, key, value in self._staged:
                    self._remember(cache, key, value)
        except BaseException:
            self._discard(staged, relpath if published else None)
            raise
        log.debug(
            "instance received",
            extra=fields(
                outcome=result.outcome.value,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                sop_instance_uid=header.sop_instance_uid,
                modality=header.modality,
                size=len(data),
            ),
        )
        return result

    def _discard(self, staged: Future[Path], published: str | None) -> None:
        """After a failure: drop the staged file, and a published one no row owns."""
        try:
            self.spool.discard(staged.result())
        except SijnodeError:
            pass  # staging itself failed and cleaned up after itself
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
        """Finish pending spool writes and stop the helper threads."""
        self._writer.shutdown(wait=True)

    def record_spooled(self, relpath: str) -> IngestResult | None:
        """Record a spooled file that has no row (a crash between write and commit)."""
        data = self.spool.read(relpath)
        header = read_header(data)
        sha = content_hash(data)
        with self._lock, transaction(self.sessions) as session:
            self._staged.clear()
            if self._find_duplicate(session, header.sop_instance_uid, sha) is not None:
                return None
            return self._record(session, header, sha, len(data), relpath, None, None, utcnow())

    @staticmethod
    def _find_duplicate(session: Session, sop_uid: str, sha: str) -> Instance | None:
        return session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_uid, Instance.sha256 == sha)
        ).first()

    def _record(
        self,
        session: Session,
        header: InstanceHeader,
        sha: str,
        size: int,
        relpath: str,
        association_id: int | None,
        calling_ae_title: str | None,
        now: datetime,
    ) -> IngestResult:
        """Write the instance's rows in ``session`` (prebuilt statements on the hot path)."""
        conn = session.connection()
        same_uid = conn.execute(_SAME_UID, {"b_uid": header.sop_instance_uid}).all()
        study_id, generation = self._touch_study(session, header, calling_ae_title, now)
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
        instance_id = conn.execute(
            _INSERT_INSTANCE,
            {
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
            },
        ).scalar_one()
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
        self._event(
            session,
            EventType.INSTANCE_CONFLICT if conflict else EventType.INSTANCE_STORED,
            study_id,
            association_id,
            {"sop_instance_uid": header.sop_instance_uid, "sha256": sha, "size": size},
        )
        outcome = IngestOutcome.CONFLICT if conflict else IngestOutcome.STORED
        return IngestResult(outcome, study_id, instance_id, relpath)

    @staticmethod
    def _event(
        session: Session,
        type_: EventType,
        study_id: int,
        association_id: int | None,
        detail: dict[str, object],
    ) -> None:
        session.connection().execute(
            _INSERT_EVENT,
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
        header: InstanceHeader,
        calling_ae_title: str | None,
        now: datetime,
    ) -> tuple[int, int]:
        """Study id and generation; a cheap conditional UPDATE while it is receiving."""
        cached = self._studies.get(header.study_instance_uid)
        if cached is not None:
            study_id, generation = cached
            touched = session.connection().execute(
                _TOUCH_STUDY, {"b_id": study_id, "b_generation": generation, "b_now": now}
            )
            if touched.rowcount == 1:
                return study_id, generation
        study = self._study(session, header, calling_ae_title, now)
        self._staged.append(
            (self._studies, header.study_instance_uid, (study.id, study.generation))
        )
        return study.id, study.generation

    def _touch_series(
        self, session: Session, study_id: int, header: InstanceHeader, now: datetime
    ) -> int:
        expected = header.images_in_acquisition or header.series_related_instances
        series_id = self._series_ids.get(header.series_instance_uid)
        if series_id is not None:
            touched = session.connection().execute(
                _TOUCH_SERIES, {"b_id": series_id, "b_now": now, "b_expected": expected}
            )
            if touched.rowcount == 1:
                return series_id
        series_id = self._series(session, study_id, header, now).id
        self._staged.append((self._series_ids, header.series_instance_uid, series_id))
        return series_id

    @staticmethod
    def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)

    def _study(
        self,
        session: Session,
        header: InstanceHeader,
        calling_ae_title: str | None,
        now: datetime,
    ) -> Study:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        ).first()
        if study is None:
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
        self, session: Session, study_id: int, header: InstanceHeader, now: datetime
    ) -> Series:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).first()
        expected = header.images_in_acquisition or header.series_related_instances
        if series is None:
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
