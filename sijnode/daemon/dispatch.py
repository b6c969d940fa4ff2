"""Dispatch: complete studies become committed job rows, then queue messages.

Order (STYLE.md, messages): the job row and its events are committed first; only then is
the message sent. A message that could not be sent leaves the job queued with no
``dispatched_at`` (and a ``job_dispatch_failed`` event); the reconciler sends it again.
The job key is the content hash of the selected series plus the pipeline and model
version, so re-sending an identical study creates no second job (it is recorded as a
duplicate).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.routing import PIPELINE_SOP_CLASSES, RouteMatch, SeriesFacts, route_study
from sijnode.db.engine import record_event, transaction
from sijnode.db.instances import check_job_inputs
from sijnode.db.lifecycle import TERMINAL_JOB_STATES, transition
from sijnode.db.records import mark_dispatched, supersede_job
from sijnode.db.schema import (
    EventType,
    Instance,
    Job,
    JobState,
    Series,
    Study,
    StudyState,
)
from sijnode.errors import MixedInputsError, SijnodeError
from sijnode.logs import fields
from sijnode.models.identity import ModelIdentity
from sijnode.settings import Settings
from sijnode.workers.messages import JobMessage
from sijnode.workers.queue import JobQueue

log = logging.getLogger(__name__)

#: Pipeline name → its model identity (None: no model configured).
ModelLookup = Callable[[str], ModelIdentity | None]


class SendOutcome(enum.StrEnum):
    """What :meth:`Dispatcher.send` did with one job."""

    SENT = "sent"  #: the queue accepted the message; ``dispatched_at`` is set
    FAILED = "failed"  #: the queue refused it; the job stays queued and unsent
    #: nothing sent: the job has finished or was superseded, or no longer meets the
    #: caller's condition (the reconciler's: still unsent, still unclaimed)
    SKIPPED = "skipped"


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one job's message, with the task id or the error."""

    job_id: int
    outcome: SendOutcome
    task_id: str | None = None
    error: str | None = None

    @property
    def sent(self) -> bool:
        """Whether the queue now holds a message for the job."""
        return self.outcome is SendOutcome.SENT


@dataclass(frozen=True)
class DispatchResult:
    """What dispatching one study did."""

    created: list[int]
    duplicates: list[int]
    ignored_reason: str | None = None
    #: jobs whose inputs failed the one-study, one-patient check (recorded failed)
    refused: list[int] = field(default_factory=list)


class _Made(StrEnum):
    """What :meth:`Dispatcher._job_for` did."""

    CREATED = "created"
    DUPLICATE = "duplicate"
    REFUSED = "refused"


def job_key(instance_hashes: list[str], pipeline: str, model_version: str) -> str:
    """Content hash of the selected series + pipeline + model version."""
    digest = hashlib.sha256()
    for sha in sorted(instance_hashes):
        digest.update(sha.encode())
    digest.update(f"|{pipeline}|{model_version}".encode())
    return digest.hexdigest()


def _selected_instances(
    session: Session, series_id: int, pipeline: str
) -> tuple[list[Instance], int]:
    """The newest copy of each SOP instance of one series row that ``pipeline`` reads, in
    slice order, and how many other instances the series holds.

    By the series' row id, never by its UID: another study may reuse the UID, and its
    instances belong to its own series row (docs/receiving.md). Only instances of a SOP
    class the pipeline reads (:data:`~sijnode.daemon.routing.PIPELINE_SOP_CLASSES`) are
    selected: a private non-image object in the same series as the slices (e.g. Siemens
    CSA Non-Image, 1.3.12.2.1107.5.9.1) never reaches a pipeline. A pipeline with no
    entry there reads every instance.
    """
    rows = session.scalars(
        select(Instance).where(Instance.series_id == series_id).order_by(Instance.id)
    ).all()
    newest: dict[str, Instance] = {}
    for row in rows:
        newest[row.sop_instance_uid] = row
    wanted = PIPELINE_SOP_CLASSES.get(pipeline)
    selected = [i for i in newest.values() if wanted is None or i.sop_class_uid in wanted]
    ordered = sorted(
        selected,
        key=lambda i: (
            i.slice_position if i.slice_position is not None else float("inf"),
            i.instance_number if i.instance_number is not None else 0,
            i.sop_instance_uid,
        ),
    )
    return ordered, len(newest) - len(selected)


def _series_facts(session: Session, study_id: int) -> dict[str, tuple[int, SeriesFacts]]:
    """The study's own series, by SeriesInstanceUID (unique within a study): row id, facts."""
    counts = session.execute(
        select(Series, func.count(func.distinct(Instance.sop_instance_uid)))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .group_by(Series.id)
        .order_by(Series.id)
    ).all()
    return {
        series.series_instance_uid: (series.id, SeriesFacts.of(series, int(n)))
        for series, n in counts
    }


class Dispatcher:
    """Turns complete studies into jobs and hands them to a queue."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        queue: JobQueue,
        models: ModelLookup,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = queue
        self.models = models
        self._send_lock = threading.Lock()  # the completion loop and the reconciler send

    def dispatch_study(self, study_id: int) -> DispatchResult:
        """Route a complete study and create its jobs; then send the new ones."""
        created: list[int] = []
        duplicates: list[int] = []
        refused: list[int] = []
        with transaction(self.sessions) as session:
            # Locked (PostgreSQL): a late instance that reopens the study waits for this.
            study = session.get_one(Study, study_id, with_for_update=True)
            if study.state is not StudyState.COMPLETE:
                # reopened by a late instance since it was judged complete: judged again
                log.info(
                    "study no longer complete: not dispatched",
                    extra=fields(study_id=study_id, state=study.state.value),
                )
                return DispatchResult([], [])
            series = _series_facts(session, study_id)
            matches, reasons = route_study(self.settings.routes, [f for _, f in series.values()])
            if not matches:
                reason = "; ".join(reasons) or "no series"
                transition(session, study, StudyState.IGNORED, reason)
                log.info("study ignored: no route matched", extra=fields(study_id=study_id))
                return DispatchResult([], [], reason)
            for match in matches:
                series_id = series[match.series.series_instance_uid][0]
                job, made = self._job_for(session, study, match, series_id)
                {_Made.CREATED: created, _Made.DUPLICATE: duplicates, _Made.REFUSED: refused}[
                    made
                ].append(job.id)
            transition(
                session,
                study,
                StudyState.DISPATCHED,
                jobs=created,
                duplicates=duplicates,
                refused=refused,
            )
        for job_id in created:
            self.send(job_id)
        return DispatchResult(created, duplicates, refused=refused)

    def _job_for(
        self, session: Session, study: Study, match: RouteMatch, series_id: int
    ) -> tuple[Job, _Made]:
        """The job of one route on one series row of ``study``: new, or the identical one.

        A new job's inputs are checked at once (one study, one patient pseudonym); one
        that fails is recorded failed with the reason and never sent.
        """
        pipeline = match.route.pipeline
        try:
            identity = self.models(pipeline)
        except SijnodeError as exc:
            # A broken model setting must not lose the study: the job waits as no_model.
            log.error("model of pipeline unusable", extra=fields(pipeline=pipeline, error=str(exc)))
            identity = None
        version = identity.version if identity else "none"
        instances, skipped = _selected_instances(session, series_id, pipeline)
        key = job_key([i.sha256 for i in instances], pipeline, version)
        existing = session.scalars(select(Job).where(Job.job_key == key)).first()
        if existing is not None:
            record_event(
                session,
                EventType.JOB_DUPLICATE,
                study_id=study.id,
                job_id=existing.id,
                job_key=key,
                generation=study.generation,
            )
            log.info(
                "identical study re-sent: no second job",
                extra=fields(study_id=study.id, job_id=existing.id),
            )
            return existing, _Made.DUPLICATE
        job = Job(
            study_id=study.id,
            job_key=key,
            route=match.route.name,
            pipeline=pipeline,
            model_version=identity.version if identity else None,
            weights_sha256=identity.weights_sha256 if identity else None,
            series_uids=[match.series.series_instance_uid],
            spool_paths=[i.spool_path for i in instances],
            shadow=self.settings.delivery.shadow_mode,
            study_generation=study.generation,
        )
        session.add(job)
        transition(session, job, JobState.QUEUED, f"route {match.route.name}")
        record_event(
            session,
            EventType.JOB_CREATED,
            study_id=study.id,
            job_id=job.id,
            route=match.route.name,
            pipeline=pipeline,
            model_version=job.model_version,
            instances=len(instances),
            skipped_instances=skipped,
        )
        try:
            check_job_inputs(session, job)
        except MixedInputsError as exc:
            # the earlier jobs stay as they are: nothing replaces them
            transition(session, job, JobState.FAILED, str(exc))
            log.error("job refused: mixed inputs", extra=fields(job_id=job.id, error=str(exc)))
            return job, _Made.REFUSED
        earlier = session.scalars(
            select(Job).where(
                Job.study_id == study.id,
                Job.pipeline == pipeline,
                Job.id != job.id,
                Job.state != JobState.SUPERSEDED,
            )
        ).all()
        for old in earlier:
            supersede_job(session, old, job, f"study generation {study.generation}")
        return job, _Made.CREATED

    def send(self, job_id: int, expect: Callable[[Job], bool] | None = None) -> SendResult:
        """Send the message of a committed job, one short try; say what happened.

        Sends only if ``expect`` holds for the job as read now (default: never sent yet;
        the reconciler passes its own test of a job still owed a message). Sends are
        serialised, so the completion loop and the reconciler never both send one job.
        A failed send leaves the job queued without ``dispatched_at`` and records a
        ``job_dispatch_failed`` event; the reconciler (:mod:`sijnode.daemon.reconcile`)
        sends it again. Never raises for a broker failure.
        """
        owed = expect or _never_sent
        with self._send_lock:
            with transaction(self.sessions) as session:
                job = session.get_one(Job, job_id)
                if job.state in TERMINAL_JOB_STATES or not owed(job):
                    return SendResult(job_id, SendOutcome.SKIPPED)
                message = JobMessage(
                    job_id=job.id, pipeline=job.pipeline, spool_paths=job.spool_paths
                )
            try:
                task_id = self.queue.send(message)
            except SijnodeError as exc:
                self._record_failed_send(job_id, exc)
                return SendResult(job_id, SendOutcome.FAILED, error=str(exc))
            with transaction(self.sessions) as session:
                mark_dispatched(session, session.get_one(Job, job_id), task_id=task_id)
        return SendResult(job_id, SendOutcome.SENT, task_id=task_id)

    def _record_failed_send(self, job_id: int, exc: SijnodeError) -> None:
        log.error(
            "job not sent; the reconciler will send it again",
            extra=fields(job_id=job_id, error=str(exc)),
        )
        try:
            with transaction(self.sessions) as session:
                job = session.get_one(Job, job_id)
                record_event(
                    session,
                    EventType.JOB_DISPATCH_FAILED,
                    study_id=job.study_id,
                    job_id=job_id,
                    error=str(exc)[:500],
                )
        except SijnodeError as audit_exc:
            log.error(
                "could not record a failed dispatch",
                extra=fields(job_id=job_id, error=str(audit_exc)),
            )


def _never_sent(job: Job) -> bool:
    return job.dispatched_at is None
