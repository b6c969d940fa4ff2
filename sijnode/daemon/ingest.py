"""Store one received instance durably and record it: the work behind a C-STORE.

Order (nothing acknowledged is ever lost): parse the header, look for a duplicate, write
the original bytes to the spool (fsync + rename), then record the instance, its series
and study, and the event in one transaction. Only when both succeed does the caller
answer Success. A late instance for a study that was already dispatched reopens it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.header import InstanceHeader, read_header
from sijnode.daemon.spool import Spool, content_hash
from sijnode.db.engine import record_event, transaction
from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.schema import EventType, Instance, Series, Study, StudyState, utcnow
from sijnode.logs import fields

log = logging.getLogger(__name__)


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
    reopened: bool = False


class Ingestor:
    """Stores and records instances; one per node, shared by association threads."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        pseudonym_secret: str,
        site: str = "default",
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.secret = pseudonym_secret
        self.site = site
        # Study and series rows are get-or-create; one writer at a time keeps that simple
        # and SQLite serialises writers anyway.
        self._lock = threading.Lock()

    def ingest(
        self,
        data: bytes,
        association_id: int | None = None,
        calling_ae_title: str | None = None,
        received_at: datetime | None = None,
    ) -> IngestResult:
        """Store and record ``data`` (an encoded instance with file meta).

        Raises InvalidInstanceError, SpoolError (DiskFullError) or AuditError; on any of
        them nothing was acknowledged and the caller must answer with a failure status.
        """
        header = read_header(data)
        sha = content_hash(data)
        relpath = self.spool.relpath_for(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, sha
        )
        with self._lock, transaction(self.sessions) as session:
            duplicate = self._find_duplicate(session, header.sop_instance_uid, sha)
            if duplicate is not None:
                # A re-send touches the study (so it is judged again and, if it was already
                # dispatched, its identical job key is recorded as a duplicate job).
                self._study(session, header, calling_ae_title, received_at or utcnow())
                record_event(
                    session,
                    EventType.INSTANCE_DUPLICATE,
                    study_id=duplicate.study_id,
                    association_id=association_id,
                    sop_instance_uid=duplicate.sop_instance_uid,
                )
                return IngestResult(
                    IngestOutcome.DUPLICATE, duplicate.study_id, duplicate.id, duplicate.spool_path
                )
            newly_written = not self.spool.path(relpath).exists()
            self.spool.write(relpath, data, sha)
            try:
                result = self._record(
                    session,
                    header,
                    sha,
                    len(data),
                    relpath,
                    association_id,
                    calling_ae_title,
                    received_at or utcnow(),
                )
                session.commit()
            except SQLAlchemyError:
                # Not recorded, so not acknowledged: keep the spool equal to the audit.
                if newly_written:
                    self.spool.path(relpath).unlink(missing_ok=True)
                raise
            return result

    def record_spooled(self, relpath: str) -> IngestResult | None:
        """Record a spooled file that has no row (a crash between write and commit)."""
        data = self.spool.read(relpath)
        header = read_header(data)
        sha = content_hash(data)
        with self._lock, transaction(self.sessions) as session:
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
        study, reopened = self._study(session, header, calling_ae_title, now)
        series = self._series(session, study, header, now)
        others = session.scalars(
            select(Instance.id).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ).all()
        conflict = bool(others)
        instance = Instance(
            series_id=series.id,
            study_id=study.id,
            association_id=association_id,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            size_bytes=size,
            sha256=sha,
            spool_path=relpath,
            instance_number=header.instance_number,
            slice_position=header.slice_position,
            conflict=conflict,
            received_at=now,
            generation=study.generation,
        )
        session.add(instance)
        if conflict:
            session.execute(update(Instance).where(Instance.id.in_(others)).values(conflict=True))
        session.flush()
        record_event(
            session,
            EventType.INSTANCE_CONFLICT if conflict else EventType.INSTANCE_STORED,
            study_id=study.id,
            association_id=association_id,
            sop_instance_uid=header.sop_instance_uid,
            sha256=sha,
            size=size,
        )
        if conflict:
            log.warning(
                "instance conflict: same SOP Instance UID, different bytes; both kept",
                extra=fields(sop_instance_uid=header.sop_instance_uid, sha256=sha),
            )
        outcome = IngestOutcome.CONFLICT if conflict else IngestOutcome.STORED
        return IngestResult(outcome, study.id, instance.id, relpath, reopened)

    def _study(
        self,
        session: Session,
        header: InstanceHeader,
        calling_ae_title: str | None,
        now: datetime,
    ) -> tuple[Study, bool]:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        ).first()
        reopened = False
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
            return study, False
        if study.state != StudyState.RECEIVING:
            # A late instance: the study is assembled again and re-run after the quiet
            # period; the new job supersedes the earlier one (LANDSCAPE.md, lead 1).
            previous = study.state
            study.state = StudyState.RECEIVING
            study.generation += 1
            study.completed_at = None
            study.completion_reason = None
            study.ignored_reason = None
            study.first_received_at = now
            reopened = True
            record_event(
                session,
                EventType.STUDY_REOPENED,
                study_id=study.id,
                previous_state=previous.value,
                generation=study.generation,
            )
        study.last_received_at = now
        return study, reopened

    def _series(
        self, session: Session, study: Study, header: InstanceHeader, now: datetime
    ) -> Series:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).first()
        expected = header.images_in_acquisition or header.series_related_instances
        if series is None:
            series = Series(
                study_id=study.id,
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
