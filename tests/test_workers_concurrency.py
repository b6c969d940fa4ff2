"""Several workers writing to the PostgreSQL audit at once: no lost or torn updates; a
duplicate message for a job another worker runs waits for its lease and does not run it,
one whose worker died runs it again once (``sijnode.workers.lease``)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from sqlalchemy import func, select

from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.records import record_prediction
from sijnode.db.schema import Event, EventType, Job, JobState, JobTransition, Study
from sijnode.settings import load_settings
from sijnode.workers.context import make_worker_context
from sijnode.workers.jobs import WorkerContext, execute_job
from sijnode.workers.lease import Lease, take_lease


def _jobs(url: str, n: int) -> list[int]:
    sessions = make_sessionmaker(make_engine(url))
    with transaction(sessions) as s:
        study = Study(study_instance_uid="1.2.3.4", site="t")
        s.add(study)
        s.flush()
        jobs = [
            Job(study_id=study.id, job_key=f"k{i}", route="r", pipeline="ct", spool_paths=[])
            for i in range(n)
        ]
        s.add_all(jobs)
        s.flush()
        return [j.id for j in jobs]


def _run_threads(url: str, work) -> list[BaseException]:
    errors: list[BaseException] = []
    settings = load_settings(overrides={"database": {"url": url}})

    def worker(index: int) -> None:
        # one engine per worker, as separate worker processes would have
        ctx = make_worker_context(settings)
        try:
            work(ctx, index)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_four_workers_on_distinct_jobs(pg_url: str) -> None:
    upgrade(pg_url)
    ids = _jobs(pg_url, 40)

    def work(ctx: WorkerContext, index: int) -> None:
        for job_id in ids[index::4]:
            assert execute_job(ctx, job_id) is JobState.NO_MODEL
            with transaction(ctx.sessions) as s:
                record_prediction(s, s.get_one(Job, job_id), 0.5, True, 0.5, level="study")

    assert _run_threads(pg_url, work) == []
    sessions = make_sessionmaker(make_engine(pg_url))
    with sessions() as s:
        states = s.scalars(select(Job.state)).all()
        assert states == [JobState.NO_MODEL] * 40
        assert s.scalar(select(func.count()).select_from(JobTransition)) == 80
        predicted = s.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.type == EventType.PREDICTION_RECORDED)
        )
        assert predicted == 40


def test_four_workers_on_the_same_job_lose_no_update(pg_url: str) -> None:
    upgrade(pg_url)
    (job_id,) = _jobs(pg_url, 1)

    def work(ctx: WorkerContext, index: int) -> None:
        assert execute_job(ctx, job_id) is JobState.NO_MODEL

    assert _run_threads(pg_url, work) == []
    sessions = make_sessionmaker(make_engine(pg_url))
    with sessions() as s:
        job = s.get_one(Job, job_id)
        # every run counted: no lost update of the attempt counter
        assert job.attempts == 4
        states = s.scalars(
            select(JobTransition.state)
            .where(JobTransition.job_id == job_id)
            .order_by(JobTransition.id)
        ).all()
        # each run wrote its own transitions; none was lost or torn
        assert sorted(states) == sorted([JobState.RUNNING, JobState.NO_MODEL] * 4)
        assert job.state is JobState.NO_MODEL


def test_a_redelivered_message_leaves_a_job_past_its_run(pg_url: str) -> None:
    """acks_late re-delivers a message whose job was already reported: nothing changes.
    (A job left ``inferred`` is only reported: tests/test_workers_reporting.py.)"""
    upgrade(pg_url)
    (job_id,) = _jobs(pg_url, 1)
    ctx = make_worker_context(load_settings(overrides={"database": {"url": pg_url}}))
    with transaction(ctx.sessions) as s:
        job = s.get_one(Job, job_id)
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.REPORTED):
            transition(s, job, state)
    assert execute_job(ctx, job_id) is JobState.REPORTED
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.REPORTED and job.attempts == 0
        assert s.scalar(select(func.count()).select_from(JobTransition)) == 4


def test_hostname_is_looked_up_when_the_context_is_built(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-at-runtime")
    ctx = make_worker_context(load_settings(overrides={"database": {"url": pg_url}}))
    assert ctx.hostname == "worker-at-runtime"


def _lease_ctx(url: str, seconds: float) -> WorkerContext:
    settings = load_settings(
        overrides={"database": {"url": url}, "broker": {"lease_seconds": seconds}}
    )
    return make_worker_context(settings)


def _held(ctx: WorkerContext, job_id: int, token: str, seconds: float) -> None:
    """What a worker that claimed the job leaves: running, attempt 1, its lease."""
    with transaction(ctx.sessions) as s:
        job = s.get_one(Job, job_id)
        transition(s, job, JobState.QUEUED)
        job.attempts = 1
        take_lease(job, token, seconds)
        transition(s, job, JobState.RUNNING, "attempt 1")


def _runs(ctx: WorkerContext, job_id: int) -> list[JobState]:
    with ctx.sessions() as s:
        return list(
            s.scalars(
                select(JobTransition.state)
                .where(JobTransition.job_id == job_id)
                .order_by(JobTransition.id)
            )
        )


def test_a_duplicate_message_for_a_job_another_worker_runs_does_not_run_it(pg_url: str) -> None:
    """The holder is alive (its heartbeat renews the lease past its first expiry): a second
    delivery waits, never claims the job, and leaves it as the holder finished it."""
    upgrade(pg_url)
    (job_id,) = _jobs(pg_url, 1)
    ctx = _lease_ctx(pg_url, 1.5)
    _held(ctx, job_id, "holder", 1.5)
    answers: list[JobState] = []
    with Lease(ctx.sessions, job_id, "holder", 1.5) as lease:
        duplicate = threading.Thread(target=lambda: answers.append(execute_job(ctx, job_id)))
        duplicate.start()
        time.sleep(4.0)  # well past the lease the holder took: only renewals keep it
        assert duplicate.is_alive() and answers == [], "the duplicate waits for the holder"
        assert lease.held
        with ctx.sessions() as s:
            assert s.get_one(Job, job_id).attempts == 1
        with transaction(ctx.sessions) as s:  # the holder's run ends
            job = s.get_one(Job, job_id)
            transition(s, job, JobState.INFERRED)
            transition(s, job, JobState.REPORTED)
    duplicate.join(30)
    assert answers == [JobState.REPORTED]
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.attempts == 1 and job.lease_token is None
    assert _runs(ctx, job_id) == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.INFERRED,
        JobState.REPORTED,
    ]


def test_a_job_whose_worker_died_runs_again_once_its_lease_lapsed(pg_url: str) -> None:
    """The holder died (no renewals): the redelivered message waits out the lease, then
    runs the job again, once, under its own lease; a later message leaves it alone."""
    upgrade(pg_url)
    (job_id,) = _jobs(pg_url, 1)
    ctx = _lease_ctx(pg_url, 2.0)
    _held(ctx, job_id, "dead-worker", 2.0)
    started = time.monotonic()
    assert execute_job(ctx, job_id) is JobState.NO_MODEL
    assert time.monotonic() - started >= 1.5, "it waited for the dead worker's lease"
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.attempts == 2 and job.lease_token is None
    assert _runs(ctx, job_id) == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.NO_MODEL,
    ]


def test_a_run_whose_lease_was_taken_over_records_nothing(pg_url: str) -> None:
    """A holder that only stalled past its lease: once another run took the job over, its
    heartbeat says so and its final state is not written."""
    from sijnode.workers.finish import finish_job

    upgrade(pg_url)
    (job_id,) = _jobs(pg_url, 1)
    ctx = _lease_ctx(pg_url, 1.0)
    _held(ctx, job_id, "stalled", 1.0)
    with transaction(ctx.sessions) as s:  # the lease lapsed and another run claimed it
        take_lease(s.get_one(Job, job_id), "new-run", 60)
    with Lease(ctx.sessions, job_id, "stalled", 1.0) as lease:
        time.sleep(0.8)
        assert not lease.held
        assert (
            finish_job(ctx.sessions, job_id, JobState.FAILED, "late", token="stalled")
            is JobState.RUNNING
        )
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.RUNNING and job.lease_token == "new-run"
