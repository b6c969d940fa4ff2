"""Several workers writing to the PostgreSQL audit at once: no lost or torn updates."""

from __future__ import annotations

import socket
import threading

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
