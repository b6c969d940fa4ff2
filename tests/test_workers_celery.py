"""Broker mode: a real ``sijnode worker`` process runs jobs from Redis, audit on PostgreSQL.

The worker reads every pipeline's queue and the job queue by default (no ``--queues``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from sqlalchemy import select

from sijnode.daemon.scp import SUCCESS
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Job, JobState, JobTransition
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import make_study

SIJNODE = str(Path(sys.executable).parent / "sijnode")


def test_worker_process_runs_jobs_from_redis(tmp_path: Path, redis_url: str, pg_url: str) -> None:
    queue = f"sijnode.test.{uuid.uuid4().hex[:8]}"
    upgrade(pg_url)
    pipelines = {"ct": {"queue": f"{queue}.ct"}, "mr": {"queue": f"{queue}.mr"}}
    settings = node_settings(
        tmp_path, db_url=pg_url, broker={"url": redis_url, "queue": queue}, pipelines=pipelines
    )
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": pg_url,
            "SIJNODE_BROKER__URL": redis_url,
            "SIJNODE_BROKER__QUEUE": queue,
            "SIJNODE_PIPELINES__CT__QUEUE": f"{queue}.ct",
            "SIJNODE_PIPELINES__MR__QUEUE": f"{queue}.mr",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
        }
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [SIJNODE, "worker", "--concurrency", "1"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        with running_node(settings, migrate=False) as node:
            assert node.embedded is None
            assert send(make_study("celery", n=3), node.scp.port) == [SUCCESS] * 3

            def finished() -> list[Job]:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                with node.sessions() as s:
                    return list(s.scalars(select(Job).where(Job.state == JobState.NO_MODEL)))

            job = wait_for(finished, timeout=90)[0]
            assert job.worker_host == socket.gethostname()
            assert job.dispatched_at is not None
            with node.sessions() as s:
                states = [
                    t.state
                    for t in s.scalars(
                        select(JobTransition)
                        .where(JobTransition.job_id == job.id)
                        .order_by(JobTransition.id)
                    )
                ]
            assert states == [JobState.QUEUED, JobState.RUNNING, JobState.NO_MODEL]
    finally:
        worker.terminate()
        worker.wait(30)
