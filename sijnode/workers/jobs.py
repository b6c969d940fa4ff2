"""The job task body, shared by the Celery task and the embedded worker.

Idempotent: a job that already reached a terminal state, was superseded, or was
reported is left as it is, so a re-delivered message (``acks_late``,
recovery) does no harm. A pipeline with no model configured puts the job in the
``no_model`` state: it is kept, not dropped, and ``sijnode serve`` sends it again at
start-up once a model is configured. A job that reaches ``inferred`` is reported at once
(:func:`sijnode.workers.reporting.report_job`); one found ``inferred`` (its worker was lost
between the two steps) is only reported, from its saved result. A job that another run
holds under a live lease is never run a second time: the message waits for that run, and
runs the job again only once the lease lapsed (its worker died; :mod:`sijnode.workers.lease`).
States change only through :func:`sijnode.db.lifecycle.transition`."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import transaction
from sijnode.db.instances import check_job_inputs
from sijnode.db.lifecycle import JOB, TERMINAL_JOB_STATES, transition
from sijnode.db.schema import Job, JobState, utcnow
from sijnode.errors import MixedInputsError, NoModelError, SijnodeError, UnknownJobError
from sijnode.logs import fields
from sijnode.models.identity import ModelIdentities, ModelIdentity
from sijnode.settings import Settings
from sijnode.workers.finish import fail_unfinished, finish_job
from sijnode.workers.lease import (
    LEASED_STATES,
    Lease,
    lease_left,
    new_token,
    take_lease,
)
from sijnode.workers.metrics import WorkerMetrics
from sijnode.workers.reporting import report_job

if TYPE_CHECKING:
    from sijnode.models.result import PipelineResult

log = logging.getLogger(__name__)

#: A pipeline implementation: runs a job whose model is known, returns the final state.
PipelineRunner = Callable[["WorkerContext", Job, ModelIdentity], JobState]

#: How often a message waiting for another run's lease looks at the job again.
_LEASE_POLL_SECONDS = 1.0

#: States in which a job's inference is done: a re-delivered message leaves them alone.
INFERENCE_DONE_STATES = TERMINAL_JOB_STATES | {JobState.INFERRED, JobState.REPORTED}


@dataclass
class WorkerContext:
    """What a worker holds for its whole life: settings, sessions, loaded pipelines."""

    settings: Settings
    sessions: sessionmaker[Session]
    runners: dict[str, PipelineRunner]
    models: ModelIdentities
    #: Recorded on every job this worker claims; looked up when the context is built.
    hostname: str = field(default_factory=lambda: socket.gethostname())
    #: Device for every pipeline (``sijnode worker --device``); None = each pipeline's own.
    device: str | None = None
    #: Loaded (warm) pipelines of this process, by model-set version.
    loaded: dict[str, Any] = field(default_factory=dict)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    #: The result of the job just inferred, by job id, handed from the runner to the
    #: report step in the same process (heatmaps and all); emptied after each job.
    results: dict[int, PipelineResult] = field(default_factory=dict)


def execute_job(ctx: WorkerContext, job_id: int) -> JobState:
    """Run job ``job_id`` once; return the state it ends in.

    Before anything runs, the job's inputs are checked to come from its own study and
    one patient pseudonym (:func:`~sijnode.db.instances.check_job_inputs`); a job that
    fails the check is failed with the reason, and no pipeline sees its files. A job
    that another run holds under a live lease (:mod:`sijnode.workers.lease`) is not run
    again: this call waits until that run ends (and then leaves the job as it finds it)
    or its lease lapses (its worker died: then the job runs again here). Any unexpected
    error of the run (outside the pipeline, which fails its own jobs) fails the job with
    the reason instead of leaving it ``queued``, ``running`` or ``inferred``; only a job
    that does not exist, or an audit that cannot be written even to record the failure,
    raises.
    """
    token = new_token()
    try:
        return _execute(ctx, job_id, token)
    except Exception as exc:
        log.exception("job raised", extra=fields(job_id=job_id))
        reason = f"{type(exc).__name__}: {exc}"
        if not fail_unfinished(ctx.sessions, job_id, reason, token):
            raise
        return JobState.FAILED


@dataclass(frozen=True)
class _Claim:
    """What :func:`_claim` decided: wait ``wait`` seconds, or run (the report only)."""

    wait: float = 0.0
    report_only: bool = False
    pipeline: str = ""
    job_version: str | None = None


def _claim(ctx: WorkerContext, job_id: int, token: str, waited: bool) -> _Claim | JobState:
    """Claim the job under the lease ``token``, or say how long to wait for another run's
    lease, or return the state of a job this message has nothing to do for."""
    lease = ctx.settings.broker.lease_seconds
    with transaction(ctx.sessions) as session:
        # Row lock (PostgreSQL): a job delivered to two workers keeps a consistent claim.
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJobError(f"expected job {job_id} in the audit database, found no such job")
        now = utcnow()
        if job.state in LEASED_STATES and job.lease_token is not None:
            left = lease_left(job, now)
            if left > 0:  # another run holds it and is alive: a duplicate message waits
                if not waited:
                    log.info(
                        "job held by another run: waiting for its lease",
                        extra=fields(job_id=job_id, state=job.state.value, seconds=left),
                    )
                return _Claim(wait=min(left, _LEASE_POLL_SECONDS))
            log.warning(
                "job lease lapsed: its worker was lost; the job runs again",
                extra=fields(job_id=job_id, state=job.state.value),
            )
        if job.state is JobState.INFERRED:
            # inferred, not reported: the worker that ran it was lost between the steps
            log.info("job inferred but not reported: reporting it", extra=fields(job_id=job_id))
            take_lease(job, token, lease, now)
            return _Claim(report_only=True, pipeline=job.pipeline)
        if job.state in INFERENCE_DONE_STATES or JobState.RUNNING not in JOB.allowed(job.state):
            # finished, or past its run (reported): a re-delivered message leaves it
            log.info("job already run", extra=fields(job_id=job_id, state=job.state.value))
            return JobState(job.state)
        job.worker_host = ctx.hostname
        job.attempts = (job.attempts or 0) + 1
        take_lease(job, token, lease, now)
        transition(session, job, JobState.RUNNING, f"attempt {job.attempts}")
        try:
            check_job_inputs(session, job)
        except MixedInputsError as exc:
            job.lease_token = job.lease_expires_at = None
            transition(session, job, JobState.FAILED, str(exc))
            log.error("job refused: mixed inputs", extra=fields(job_id=job_id, error=str(exc)))
            return JobState.FAILED
        return _Claim(pipeline=job.pipeline, job_version=job.model_version)


def _execute(ctx: WorkerContext, job_id: int, token: str) -> JobState:
    waited = False
    while True:
        claim = _claim(ctx, job_id, token, waited)
        if isinstance(claim, JobState):
            return claim
        if not claim.wait:
            break
        waited = True
        time.sleep(claim.wait)
    with Lease(ctx.sessions, job_id, token, ctx.settings.broker.lease_seconds):
        if claim.report_only:
            return report_job(ctx, job_id)
        return _run(ctx, job_id, token, claim.pipeline, claim.job_version)


def _run(
    ctx: WorkerContext, job_id: int, token: str, pipeline: str, job_version: str | None
) -> JobState:
    """Run the claimed job's pipeline (under its lease), then report it."""
    started = time.perf_counter()
    runner = ctx.runners.get(pipeline)
    try:
        identity = ctx.models(pipeline)
    except SijnodeError as exc:
        identity = None
        reason = str(exc)
    else:
        reason = (
            f"no model configured for pipeline {pipeline!r}: set pipelines.{pipeline}.model"
            if identity is None
            else f"pipeline {pipeline!r} has no implementation in this worker"
        )
    if identity is not None and job_version is not None and job_version != identity.version:
        # the job key names a model set; running another one would record a false result
        reason = (
            f"job {job_id} needs model {job_version} for pipeline {pipeline!r}; "
            f"this worker has {identity.version}"
        )
        identity = None
    if identity is None or runner is None:
        final = finish_job(ctx.sessions, job_id, JobState.NO_MODEL, reason, token=token)
        log.warning("job waits: no model", extra=fields(job_id=job_id, pipeline=pipeline))
        ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
        return final
    with transaction(ctx.sessions) as session:
        job = session.get_one(Job, job_id)
    try:
        final = runner(ctx, job, identity)
    except NoModelError as exc:  # the model cannot be loaded here: the job waits
        final = finish_job(ctx.sessions, job_id, JobState.NO_MODEL, str(exc), token=token)
        log.error("job waits: model not loadable", extra=fields(job_id=job_id, error=str(exc)))
        ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
        return final
    except Exception as exc:  # a failing pipeline fails its job, not the worker
        log.exception("pipeline raised", extra=fields(job_id=job_id))
        final = finish_job(ctx.sessions, job_id, JobState.FAILED, str(exc), token=token)
        log.error("job failed", extra=fields(job_id=job_id, error=str(exc)))
        ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
        return final
    ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
    if final is JobState.INFERRED:  # the result is still in memory: report it now
        final = report_job(ctx, job_id, ctx.results.pop(job_id, None))
    ctx.results.pop(job_id, None)
    seconds = time.perf_counter() - started
    log.info("job finished", extra=fields(job_id=job_id, state=final.value, seconds=seconds))
    ctx.metrics.job_seconds.labels(pipeline=pipeline).observe(seconds)
    return final
