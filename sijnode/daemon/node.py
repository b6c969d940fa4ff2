"""The node: builds every part from the settings and runs them (the application factory).

One engine per process, dependencies passed in, nothing global. ``Node.start`` makes the
audit agree with the spool first (records orphaned spool files, closes association rows
left open), opens the DICOM port, then starts the completion loop (which dispatches the
complete studies), the reconciler (which sends the jobs owed a message,
:mod:`sijnode.daemon.reconcile`), the retention sweeper (:mod:`sijnode.daemon.retention`)
and the delivery loop
(:class:`~sijnode.delivery.scheduler.DeliveryScheduler`: sends the deliveries the workers
queue with each report, with retries whose schedule is in the audit). Nothing before the
port opens waits for the broker. With ``delivery.commitment_port = 0`` the DICOM
listener itself takes the Storage Commitment N-EVENT-REPORTs (PS3.4 J.3.3) and hands
them to the delivery loop's handler.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.completion import assess
from sijnode.daemon.dispatch import Dispatcher
from sijnode.daemon.ingest import Ingestor
from sijnode.daemon.metrics import NodeMetrics
from sijnode.daemon.reconcile import Peer, Reconciler, peers_of, run_forever
from sijnode.daemon.retention import Retention
from sijnode.daemon.retention import run_forever as sweep_forever
from sijnode.daemon.scp import StorageSCP
from sijnode.daemon.spool import Spool
from sijnode.db.engine import (
    fresh_row_sessions,
    make_engine,
    make_sessionmaker,
    record_event,
    transaction,
)
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import check_schema_current
from sijnode.db.schema import EventType, Instance, Study, StudyState, utcnow
from sijnode.delivery.scheduler import DeliveryScheduler
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
    """What start-up recovery found and did (before the DICOM port opens).

    The broker is not touched here: the studies and jobs counted as owed are dispatched
    and sent in the background, by the completion loop and the reconciler.
    """

    partial_files_removed: int
    orphans_recorded: int
    associations_closed: int
    studies_to_dispatch: int
    jobs_to_send: int
    #: Spool removals left pending by a crash, closed from the files still there.
    removals_recovered: int = 0


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
            fresh_sessions=fresh_row_sessions(sessions, settings.database.sqlite_synchronous),
        )
        self.models = ModelIdentities(settings.pipelines, settings.data_dir)
        self.embedded: EmbeddedWorker | None = None
        self.queue = self._make_queue()
        self.dispatcher = Dispatcher(settings, sessions, self.queue, self.models)
        self.delivery = DeliveryScheduler(settings, sessions, registry=self.metrics.registry)
        if self.embedded is not None:  # a job just reported: look for its deliveries now
            self.embedded.on_done = lambda _job_id: self.delivery.wake()
        self.scp = StorageSCP(
            settings.node,
            self.ingestor,
            self.metrics,
            commitment_handler=(
                None if settings.delivery.commitment_port else self.delivery.commitment_handler
            ),
        )
        self.reconciler = Reconciler(
            sessions,
            self.dispatcher,
            settings.broker,
            self.metrics,
            can_lose_messages=self.queue.can_lose_messages,
            has_model=self.models.usable,
            live_peers=self._live_peers,
        )
        self._draining: ThreadedAssociationServer | None = None  # closed, associations open
        self.retention = Retention(
            settings.storage, sessions, self.spool, self.metrics, data_dir=settings.data_dir
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._loop = threading.Thread(target=self._completion_loop, name="sijnode-completion")
        self._reconcile = threading.Thread(
            target=run_forever,
            args=(self.reconciler, settings.broker.reconcile_interval_seconds, self._stop),
            name="sijnode-reconcile",
        )
        self._sweeper = threading.Thread(
            target=sweep_forever,
            args=(self.retention, settings.storage.sweep_interval_seconds, self._stop),
            name="sijnode-retention",
        )

    def _make_queue(self) -> JobQueue:
        if not self.settings.broker.url:
            ctx = make_worker_context(self.settings, self.sessions, self.models)
            self.embedded = EmbeddedWorker(ctx)
            return self.embedded
        from sijnode.workers.celery_app import make_celery

        return CeleryQueue(make_celery(self.settings), self.settings.broker)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> RecoveryReport:
        """Bind the ports, recover, listen; then dispatch and send in the background.

        The DICOM port opens as soon as the audit agrees with the spool: nothing that
        needs the broker runs before it (the completion loop dispatches complete studies,
        the reconciler sends the jobs owed). Any failure stops what was started and
        raises a SijnodeError that names the cause, so a node never runs half-started.
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
            self._reconcile.start()
            self._sweeper.start()
            self.delivery.start()
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
        """Stop accepting, let open associations finish, then stop the loops and worker.

        The DICOM port closes first. Open associations may go on for
        ``node.stop_grace_seconds``; then each gets an A-ABORT between two instances, so
        the instance in flight is answered (or, if only part of it has arrived, never
        acknowledged and removed). The spool and audit stay open until the last
        association has ended.
        """
        self._drain_listener(self.settings.node.stop_grace_seconds)
        self.scp.stop()
        self._stop.set()
        self._wake.set()
        for thread in (self._loop, self._reconcile, self._sweeper):
            if thread.is_alive():
                thread.join(10)
        self.delivery.stop()
        if self.embedded is not None:
            self.embedded.stop()
        self.ingestor.close()
        self.metrics.close()

    def _live_peers(self) -> frozenset[Peer]:
        server = self.scp.server or self._draining
        return peers_of(server.active_associations) if server is not None else frozenset()

    def _drain_listener(self, grace: float) -> None:
        """Close the listening socket; wait for, then abort, the open associations."""
        server = self.scp.server
        if server is None:
            return
        server.shutdown()  # no new association; the open ones keep their threads
        self._draining, self.scp.server = server, None
        deadline = time.monotonic() + grace
        open_ = server.active_associations
        if open_:
            log.info("stopping: waiting for open associations", extra=fields(count=len(open_)))
        while open_ and time.monotonic() < deadline:
            time.sleep(0.05)
            open_ = server.active_associations
        if not open_:
            return
        log.warning(
            "stopping: aborting open associations after the instance in flight",
            extra=fields(count=len(open_), grace_seconds=grace),
        )
        for assoc in open_:
            # Queued for the association's reader thread, which sends it between two
            # PDUs: never while it is storing and answering an instance.
            assoc.acse.send_abort(0x00)
        deadline = time.monotonic() + max(10.0, self.settings.node.dimse_timeout)
        for assoc in open_:
            assoc.join(max(0.0, deadline - time.monotonic()))
        stuck = [a for a in open_ if a.is_alive()]
        for assoc in stuck:
            assoc.abort()
        if stuck:
            log.warning("stopping: associations killed", extra=fields(count=len(stuck)))

    # -- recovery -----------------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the audit agree with the spool, and find the work left owed.

        Local only (spool and audit, no broker), so the DICOM port opens soon after.
        """
        started = utcnow()
        removed = self.spool.remove_partial_files()
        # first: a removal the last process left half done (its files are gone or not)
        removals = self.retention.recover()
        on_disk = set(self.spool.iter_files())
        with transaction(self.sessions) as session:
            known = set(
                session.scalars(
                    select(Instance.spool_path).where(Instance.removed_at.is_(None))
                ).all()
            )
            # The rows commit while the rename's directory fsync is still running (on the
            # hot path while the file's fsync runs, before the rename), and Success waits
            # for all: a row of a study still receiving whose file is gone was never
            # acknowledged (a crash or power loss in that window).
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
        # No association is open yet: every active row is one the last process left.
        closed = self.reconciler.close_stale_associations(started_before=started)
        with transaction(self.sessions) as session:
            complete = session.scalar(
                select(func.count()).select_from(Study).where(Study.state == StudyState.COMPLETE)
            )
        owed = self.reconciler.owed_at_start()
        report = RecoveryReport(removed, orphans, closed, int(complete or 0), owed, removals)
        if any(report.__dict__.values()):
            with transaction(self.sessions) as session:
                record_event(session, EventType.RECOVERY, **report.__dict__)
            log.info("recovered after restart", extra=fields(**report.__dict__))
        return report

    # -- study completion -----------------------------------------------------------------

    def check_studies(self, now: datetime | None = None) -> list[int]:
        """Complete and dispatch every study whose completion rule holds; return their ids."""
        now = now or utcnow()
        done: list[int] = []
        self.ingestor.retry_unrecord()
        with transaction(self.sessions) as session:
            receiving = session.scalars(
                select(Study).where(Study.state == StudyState.RECEIVING)
            ).all()
            self.metrics.studies_receiving.set(len(receiving))
            for study in receiving:
                verdict = assess(session, study, self.settings.completion, now)
                if not verdict.complete:
                    continue
                # In the writer's turn no instance commits meanwhile, and a study with a
                # row committed before its file is in place waits (sijnode.daemon.ingest,
                # "The hot path commits early").
                with self.ingestor.writer_turn() as unplaced:
                    if study.id in unplaced:
                        continue
                    transition(
                        session,
                        study,
                        StudyState.COMPLETE,
                        verdict.reason,
                        at=now,
                        series={uid: v.value for uid, v in verdict.series.items()},
                    )
                    session.commit()
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
