"""The node heals after a broker outage: a Redis server the test starts and kills.

No restart of the node: jobs whose send failed while Redis was down are sent by the
reconciler once it is back, each exactly once, and a real ``sijnode worker`` runs each
exactly once. A dead broker never keeps the DICOM port closed.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pynetdicom import AE
from sqlalchemy import select

from sijnode.daemon.dispatch import SendOutcome
from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    JobTransition,
    Study,
)
from sijnode.settings import Settings
from tests.conftest import free_port, require_tool
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import make_study

SIJNODE = str(Path(sys.executable).parent / "sijnode")


class RedisServer:
    """A throw-away ``redis-server`` on a fixed port, without persistence."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [require_tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        wait_for(up, timeout=20, interval=0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis.log")
    try:
        yield server
    finally:
        server.kill()


def _broker(url: str, **extra: float) -> dict[str, object]:
    return {
        "url": url,
        "queue": f"sijnode.test.{uuid.uuid4().hex[:8]}",
        "reconcile_interval_seconds": 0.5,
        "retry_initial_seconds": 0.5,
        "retry_max_seconds": 1.0,
        "connect_timeout_seconds": 1.0,
        **extra,
    }


def _events(node: Node, type_: EventType) -> Counter[int]:
    with node.sessions() as s:
        return Counter(e.job_id for e in s.scalars(select(Event).where(Event.type == type_)))


def _echo(port: int) -> bool:
    ae = AE()
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return "Status" in status and int(status.Status) == SUCCESS
    finally:
        assoc.release()


def _worker(tmp_path: Path, settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": settings.database.url,
            "SIJNODE_BROKER__URL": settings.broker.url,
            "SIJNODE_BROKER__QUEUE": settings.broker.queue,
            "SIJNODE_STORAGE__SPOOL_DIR": str(settings.storage.spool_dir),
        }
    )
    log = (tmp_path / "worker.log").open("wb")
    return subprocess.Popen(
        [SIJNODE, "worker", "--concurrency", "1"], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def test_dispatch_resumes_after_redis_returns_without_a_restart(
    tmp_path: Path, redis_server: RedisServer, pg_url: str
) -> None:
    redis_server.start()
    upgrade(pg_url)
    settings = node_settings(tmp_path, db_url=pg_url, broker=_broker(redis_server.url))
    worker = _worker(tmp_path, settings)
    try:
        with running_node(settings, migrate=False) as node:
            # Broker up: a first study runs through the worker.
            assert send(make_study("before-outage", n=3), node.scp.port) == [SUCCESS] * 3

            def states() -> dict[int, JobState]:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                with node.sessions() as s:
                    return {j.id: j.state for j in s.scalars(select(Job))}

            wait_for(lambda: list(states().values()) == [JobState.NO_MODEL], timeout=90)

            redis_server.kill()
            started = time.monotonic()
            for name in ("outage-a", "outage-b", "outage-c"):
                assert send(make_study(name, n=3), node.scp.port) == [SUCCESS] * 3
            # Recorded, not sent: queued, no dispatched_at, a job_dispatch_failed event.
            wait_for(lambda: len(states()) == 4, timeout=30)
            wait_for(lambda: len(_events(node, EventType.JOB_DISPATCH_FAILED)) == 3, timeout=30)
            with node.sessions() as s:
                unsent = list(s.scalars(select(Job).where(Job.dispatched_at.is_(None))))
            assert len(unsent) == 3
            assert {j.state for j in unsent} == {JobState.QUEUED}
            assert _echo(node.scp.port), "the listener must answer while the broker is down"
            # The reconciler keeps trying while Redis is down (backoff, no sends counted).
            time.sleep(3)
            assert sum(_events(node, EventType.JOB_DISPATCH_FAILED).values()) > 3
            assert node.metrics.job_sends.labels(outcome="sent")._value.get() == 0
            assert node.metrics.jobs_unsent._value.get() == 3
            assert time.monotonic() - started < 60

            redis_server.start()
            back = time.monotonic()
            wait_for(
                lambda: all(state is JobState.NO_MODEL for state in states().values()),
                timeout=90,
            )
            healed = time.monotonic() - back
            # Dispatch resumed within the reconciler's period (its interval plus the
            # longest backoff), the rest is the worker's own reconnect and run.
            with node.sessions() as s:
                assert all(j.dispatched_at is not None for j in s.scalars(select(Job)))
            assert node.metrics.job_sends.labels(outcome="sent")._value.get() == 3
            assert node.metrics.jobs_unsent._value.get() == 0
            time.sleep(2)  # a few more rounds: nothing is sent twice
            dispatched = _events(node, EventType.JOB_DISPATCHED)
            assert set(dispatched) == set(states()) and set(dispatched.values()) == {1}
            with node.sessions() as s:
                for job_id in states():
                    walk = [
                        t.state
                        for t in s.scalars(
                            select(JobTransition)
                            .where(JobTransition.job_id == job_id)
                            .order_by(JobTransition.id)
                        )
                    ]
                    assert walk == [JobState.QUEUED, JobState.RUNNING, JobState.NO_MODEL], walk
            assert healed < 60, f"dispatch took {healed:.1f} s to resume"
    finally:
        worker.terminate()
        worker.wait(30)


def test_dicom_port_answers_at_once_while_the_broker_is_down(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """12 jobs waiting for a dead broker: the port answers C-ECHO within 2 s of start()."""
    settings = node_settings(
        tmp_path, broker=_broker(redis_server.url, reconcile_interval_seconds=0.3)
    )
    with running_node(settings) as node:
        studies = [make_study(f"waiting-{i}", n=3) for i in range(12)]
        for study in studies:
            assert send(study, node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: len(_events(node, EventType.JOB_DISPATCH_FAILED)) == 12, timeout=60)
    with node.sessions() as s:
        assert len(list(s.scalars(select(Job).where(Job.dispatched_at.is_(None))))) == 12

    caplog.set_level(logging.INFO, logger="sijnode")
    node = Node(settings)
    began = time.monotonic()
    report = node.start()
    try:
        assert _echo(node.scp.port)
        answered = time.monotonic() - began
        assert answered < 2.0, f"C-ECHO answered {answered:.2f} s after start()"
        assert report.jobs_to_send == 12 and report.studies_to_dispatch == 0
        time.sleep(1)
        assert node.metrics.job_sends.labels(outcome="sent")._value.get() == 0

        redis_server.start()  # no worker: the messages wait in Redis
        wait_for(lambda: len(_events(node, EventType.JOB_DISPATCHED)) == 12, timeout=30)
        time.sleep(1)
        assert set(_events(node, EventType.JOB_DISPATCHED).values()) == {1}
        client = redis.Redis.from_url(redis_server.url)
        assert _queued(client, settings) == 12
        client.close()
    finally:
        node.stop()
    # Counts in the logs are true: the rounds' "sent" add up to the 12 messages.
    rounds = [r for r in caplog.records if r.getMessage() == "queue reconciled with the audit"]
    assert sum(r.fields["sent"] for r in rounds) == 12  # type: ignore[attr-defined]
    recovered = [r for r in caplog.records if r.getMessage() == "recovered after restart"]
    assert [r.fields["jobs_to_send"] for r in recovered] == [12]  # type: ignore[attr-defined]


def test_association_left_active_is_closed_with_its_true_counts(tmp_path: Path) -> None:
    """A row left ``active`` (its close was not written) is closed from the stored rows."""
    settings = node_settings(tmp_path, broker={"reconcile_interval_seconds": 0.3})
    with running_node(settings) as node:
        assert send(make_study("left-active", n=4), node.scp.port) == [SUCCESS] * 4

        def released() -> bool:
            with node.sessions() as s:
                return s.scalars(select(Association.outcome)).one() is AssociationOutcome.RELEASED

        wait_for(released)
        with transaction(node.sessions) as s:
            row = s.scalars(select(Association)).one()
            # as if the database was down when the association ended
            row.outcome, row.ended_at = AssociationOutcome.ACTIVE, None
            row.instances_received = row.bytes_received = 0
            row_id = row.id

        def closed() -> Association | None:
            with node.sessions() as s:
                found = s.get_one(Association, row_id)
                return found if found.outcome is not AssociationOutcome.ACTIVE else None

        row = wait_for(closed, timeout=10)
        with node.sessions() as s:
            sizes = [i.size_bytes for i in s.scalars(select(Instance))]
        assert row.outcome is AssociationOutcome.ABORTED
        assert row.instances_received == 4 and row.instances_failed == 0
        assert row.bytes_received == sum(sizes)
        assert row.ended_at is not None
        # An association open now is never taken for a stale one.
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_established
        try:
            time.sleep(1)
            with node.sessions() as s:
                outcomes = [
                    a.outcome for a in s.scalars(select(Association).order_by(Association.id))
                ]
            assert outcomes == [AssociationOutcome.ABORTED, AssociationOutcome.ACTIVE]
        finally:
            assoc.release()


def _queued(client: redis.Redis, settings: Settings) -> int:
    """Messages waiting in the broker: the job queue and each pipeline's own queue."""
    from sijnode.workers.queue import pipeline_queue

    names = {settings.broker.queue, *(pipeline_queue(settings, p) for p in settings.pipelines)}
    return sum(int(client.llen(name)) for name in names)


def test_running_job_of_a_worker_is_never_sent_again(tmp_path: Path) -> None:
    """At start-up in broker mode, a ``running`` job belongs to its Celery worker."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = node_settings(tmp_path, broker=_broker(f"redis://127.0.0.1:{free_port()}/0"))
    node = Node(settings, sessions)
    with transaction(sessions) as s:
        study = Study(study_instance_uid="1.2.3.4", site="default")
        s.add(study)
        s.flush()
        for key, walk in (("a", (JobState.QUEUED, JobState.RUNNING)), ("b", (JobState.QUEUED,))):
            job = Job(study_id=study.id, job_key=key, route="ct", pipeline="ct", spool_paths=[])
            for state in walk:  # the lifecycle: a running job was queued first
                transition(s, job, state)
    try:
        assert node.reconciler.owed_at_start() == 1  # b, never sent; a is its worker's
        report = node.reconciler.run_once()  # the broker is down: b fails, nothing sent
        assert (report.sent, report.failed, report.skipped) == (0, 1, 0)
        with transaction(sessions) as s:
            a, b = s.scalars(select(Job).order_by(Job.id)).all()
            failed = s.scalars(select(Event).where(Event.type == EventType.JOB_DISPATCH_FAILED))
            assert [e.job_id for e in failed] == [b.id]
            transition(s, b, JobState.RUNNING)  # claimed since (by a message sent earlier)
        # Read again right before the send: a job claimed meanwhile gets no second message.
        for job_id in (a.id, b.id):
            result = node.dispatcher.send(job_id, node.reconciler._still_owed)
            assert result.outcome is SendOutcome.SKIPPED and not result.sent
    finally:
        node.stop()
    embedded = Node(node_settings(tmp_path), sessions)
    try:
        assert embedded.reconciler.owed_at_start() == 2  # the embedded worker's own jobs
    finally:
        embedded.stop()


def test_unclaimed_job_is_sent_again_once_per_period(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A job sent long ago and never claimed (Redis lost it) gets one new message."""
    from datetime import timedelta

    from sijnode.db.records import mark_dispatched
    from sijnode.db.schema import utcnow

    redis_server.start()
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    settings = node_settings(tmp_path, broker=_broker(redis_server.url, unclaimed_after_seconds=60))
    node = Node(settings, sessions)
    try:
        with transaction(sessions) as s:
            study = Study(study_instance_uid="1.2.3.5", site="default")
            s.add(study)
            s.flush()
            lost = Job(study_id=study.id, job_key="lost", route="ct", pipeline="ct", spool_paths=[])
            fresh = Job(study_id=study.id, job_key="new", route="ct", pipeline="ct", spool_paths=[])
            for job in (lost, fresh):
                transition(s, job, JobState.QUEUED)
            mark_dispatched(s, lost, task_id="gone", at=utcnow() - timedelta(seconds=61))
            mark_dispatched(s, fresh, task_id="waiting", at=utcnow() - timedelta(seconds=30))
        assert node.reconciler.owed_at_start() == 0  # both are with the broker, as far as known
        first = node.reconciler.run_once()
        second = node.reconciler.run_once()
        assert (first.sent, second.sent) == (1, 0)
        client = redis.Redis.from_url(redis_server.url)
        assert _queued(client, settings) == 1
        client.close()
        assert _events(node, EventType.JOB_DISPATCHED) == Counter({lost.id: 2, fresh.id: 1})
    finally:
        node.stop()


@pytest.mark.parametrize("result_backend", [False, True])
def test_a_send_to_a_dead_broker_fails_at_once(
    redis_server: RedisServer, result_backend: bool
) -> None:
    """One short try per send (no kombu or result-backend retries), then it works again."""
    from sijnode.errors import DispatchError
    from sijnode.settings import load_settings
    from sijnode.workers.celery_app import make_celery
    from sijnode.workers.messages import JobMessage
    from sijnode.workers.queue import CeleryQueue

    backend = {"result_backend": redis_server.url.replace("/0", "/1")} if result_backend else {}
    settings = load_settings(overrides={"broker": _broker(redis_server.url, **backend)})
    queue = CeleryQueue(make_celery(settings), settings.broker)
    message = JobMessage(job_id=1, pipeline="ct", spool_paths=[])
    began = time.monotonic()
    for _ in range(10):
        with pytest.raises(DispatchError, match="broker did not accept job 1"):
            queue.send(message)
    assert time.monotonic() - began < 3.0, "a dead broker held the sends"
    redis_server.start()
    assert queue.send(message)
    redis_server.kill()
    began = time.monotonic()
    with pytest.raises(DispatchError):
        queue.send(message)
    assert time.monotonic() - began < 1.0
