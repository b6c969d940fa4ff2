"""The node: builds every part from the settings and runs them (the application factory).

One engine per process, dependencies passed in, nothing global. ``Node.start`` recovers
from a crash first (records orphaned spool files, resumes complete studies, sends queued
jobs again), then starts the listener, the completion loop and the metrics endpoint.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.completion import assess
from sijnode.daemon.dispatch import Dispatcher
from sijnode.daemon.ingest import Ingestor
from sijnode.daemon.metrics import NodeMetrics
from sijnode.daemon.scp import StorageSCP
from sijnode.daemon.spool import Spool
from sijnode.db.engine import make_engine, make_sessionmaker, record_event, transaction
from sijnode.db.migrate import check_schema_current
from sijnode.db.schema import EventType, Instance, Job, JobState, Study, StudyState, utcnow
from sijnode.errors import ConfigurationError, SijnodeError
from sijnode.logs import fields
from sijnode.models.identity import ModelIdentities
from sijnode.settings import DEFAULT_PSEUDONYM_SECRET, Settings
from sijnode.workers.context import make_worker_context
from sijnode.workers.embedded import EmbeddedWorker
from sijnode.workers.queue import CeleryQueue, JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What start-up recovery found and did."""

    partial_files_removed: int
    orphans_recorded: int
    studies_resumed: int
    jobs_resent: int


class Node:
    """A running sijnode: listener, spool, audit, completion loop and job queue."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        if sessions is None:
            engine = make_engine(
                settings.database.url,
                echo=settings.database.echo,
                sqlite_synchronous=settings.database.sqlite_synchronous,
            )
            check_schema_current(engine)
            sessions = make_sessionmaker(engine)
        self.sessions = sessions
        self.metrics = NodeMetrics()
        self.spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb * 2**20)
        self.ingestor = Ingestor(
            self.spool,
            sessions,
            settings.database,
            settings.node.site,
            workers=max(2, settings.node.max_associations),
        )
        self.models = ModelIdentities(settings.pipelines, settings.data_dir)
        self.embedded: EmbeddedWorker | None = None
        self.queue = self._make_queue()
        self.dispatcher = Dispatcher(settings, sessions, self.queue, self.models)
        self.scp = StorageSCP(settings.node, self.ingestor, self.metrics)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop = threading.Thread(target=self._completion_loop, name="sijnode-completion")

    def _make_queue(self) -> JobQueue:
        if not self.settings.broker.url:
            ctx = make_worker_context(self.settings, self.sessions, self.models)
            self.embedded = EmbeddedWorker(ctx)
            return self.embedded
        from sijnode.workers.celery_app import make_celery

        return CeleryQueue(make_celery(self.settings), self.settings.broker.queue)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> RecoveryReport:
        """Bind the ports, recover, then start the worker, the listener and the loop.

        Any failure stops what was started and raises a SijnodeError that names the cause,
        so a node never runs half-started.
        """
        try:
            if self.settings.metrics.port:
                address = f"{self.settings.metrics.bind_address}:{self.settings.metrics.port}"
                try:
                    self.metrics.serve(
                        self.settings.metrics.port, self.settings.metrics.bind_address
                    )
                except OSError as exc:
                    raise ConfigurationError(
                        f"metrics.port: cannot listen on {address}: {exc.strerror}"
                    ) from exc
            if self.embedded is not None:
                self.embedded.start()
            report = self.recover()
            try:
                self.scp.start()
            except OSError as exc:
                raise ConfigurationError(
                    f"node.port: cannot listen on {self.settings.node.bind_address}:"
                    f"{self.settings.node.port}: {exc.strerror}"
                ) from exc
            self._loop.start()
            if self.settings.database.pseudonym_secret == DEFAULT_PSEUDONYM_SECRET:
                log.warning(
                    "database.pseudonym_secret is the default: set a site secret before real use"
                )
            with transaction(self.sessions) as session:
                record_event(session, EventType.NODE_STARTED, port=self.scp.port)
        except BaseException:
            self.stop()
            raise
        return report

    def stop(self) -> None:
        """Stop receiving, finish the loop and the job in hand."""
        self.scp.stop()
        self._stop.set()
        self._wake.set()
        if self._loop.is_alive():
            self._loop.join(10)
        if self.embedded is not None:
            self.embedded.stop()
        self.ingestor.close()
        self.metrics.close()

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the audit agree with the spool and resume interrupted work."""
        removed = self.spool.remove_partial_files()
        on_disk = set(self.spool.iter_files())
        with transaction(self.sessions) as session:
            known = set(session.scalars(select(Instance.spool_path)).all())
            # The rows commit while the rename's directory fsync is still running, and
            # Success waits for both: a row of a study still receiving whose file is gone
            # was never acknowledged (a power loss in that window).
            missing = sorted(known - on_disk)
            lost = (
                session.scalars(
                    select(Instance.spool_path)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Instance.spool_path.in_(missing), Study.state == StudyState.RECEIVING)
                ).all()
                if missing
                else []
            )
            if lost:
                session.execute(delete(Instance).where(Instance.spool_path.in_(lost)))
                record_event(session, EventType.RECOVERY, unacknowledged_rows_removed=len(lost))
                log.warning(
                    "removed audit rows of instances never acknowledged",
                    extra=fields(count=len(lost)),
                )
        orphans = 0
        for relpath in sorted(on_disk):
            if relpath in known:
                continue
            try:
                if self.ingestor.record_spooled(relpath) is not None:
                    orphans += 1
            except SijnodeError as exc:
                log.error(
                    "spooled file could not be recorded", extra=fields(path=relpath, error=str(exc))
                )
        with transaction(self.sessions) as session:
            complete = session.scalars(
                select(Study.id).where(Study.state == StudyState.COMPLETE)
            ).all()
        for study_id in complete:
            self.dispatcher.dispatch_study(study_id)
        with transaction(self.sessions) as session:
            pending = session.scalars(
                select(Job).where(
                    Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.NO_MODEL])
                )
            ).all()
            resend = [
                j.id
                for j in pending
                if j.state is not JobState.NO_MODEL or self._has_model(j.pipeline)
            ]
        for job_id in resend:
            self.dispatcher.send(job_id)
        report = RecoveryReport(removed, orphans, len(complete), len(resend))
        if any((removed, orphans, complete, resend)):
            with transaction(self.sessions) as session:
                record_event(session, EventType.RECOVERY, **report.__dict__)
            log.info("recovered after restart", extra=fields(**report.__dict__))
        return report

    def _has_model(self, pipeline: str) -> bool:
        try:
            return self.models(pipeline) is not None
        except SijnodeError:
            return False

    # -- study completion -----------------------------------------------------------------

    def check_studies(self, now: datetime | None = None) -> list[int]:
        """Complete and dispatch every study whose completion rule holds; return their ids."""
        now = now or utcnow()
        done: list[int] = []
        with transaction(self.sessions) as session:
            receiving = session.scalars(
                select(Study).where(Study.state == StudyState.RECEIVING)
            ).all()
            self.metrics.studies_receiving.set(len(receiving))
            for study in receiving:
                verdict = assess(session, study, self.settings.completion, now)
                if not verdict.complete:
                    continue
                study.state = StudyState.COMPLETE
                study.completed_at = now
                study.completion_reason = verdict.reason
                record_event(
                    session,
                    EventType.STUDY_COMPLETE,
                    study_id=study.id,
                    reason=verdict.reason,
                    generation=study.generation,
                    series={uid: v.value for uid, v in verdict.series.items()},
                )
                self.metrics.studies_completed.labels(reason=verdict.reason or "").inc()
                done.append(study.id)
            # complete but not dispatched: an earlier dispatch failed (audit or broker down)
            done += session.scalars(
                select(Study.id).where(Study.state == StudyState.COMPLETE, Study.id.not_in(done))
            ).all()
        for study_id in done:
            result = self.dispatcher.dispatch_study(study_id)
            self.metrics.jobs_dispatched.inc(len(result.created))
            log.info(
                "study complete",
                extra=fields(
                    study_id=study_id,
                    jobs=result.created,
                    duplicates=result.duplicates,
                    ignored=result.ignored_reason is not None,
                ),
            )
        return done

    def _completion_loop(self) -> None:
        interval = self.settings.completion.check_interval_seconds
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.check_studies()
            except SijnodeError as exc:
                log.error("completion check failed; retrying", extra=fields(error=str(exc)))
