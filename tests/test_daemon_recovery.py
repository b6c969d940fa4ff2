"""Crash recovery with real processes: ``kill -9`` mid-transfer, then restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import select

from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Instance, Job, JobState, Study, StudyState
from tests.conftest import free_port
from tests.nodes import (  # noqa: F401 - receive_mode: a fixture
    current_receive_mode,
    node_settings,
    receive_mode,
    running_node,
    send,
    wait_for,
)
from tests.studies import dataset_part, encode, make_series, make_study

SIJNODE = str(Path(sys.executable).parent / "sijnode")


def _serve(tmp_path: Path, port: int, quiet: float, log_name: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_NODE__PORT": str(port),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_METRICS__PORT": "0",
            "SIJNODE_COMPLETION__QUIET_SECONDS": str(quiet),
            "SIJNODE_COMPLETION__CONTENT_QUIET_SECONDS": str(quiet),
            "SIJNODE_COMPLETION__CHECK_INTERVAL_SECONDS": "0.2",
            "SIJNODE_NODE__RECEIVE_MODE": current_receive_mode(),
        }
    )
    log = (tmp_path / log_name).open("wb")
    proc = subprocess.Popen([SIJNODE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    ae = AE()
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / log_name).read_text()
        assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
        if assoc.is_established:
            assoc.release()
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("sijnode serve did not start listening")


@pytest.mark.usefixtures("receive_mode")
def test_kill_9_mid_transfer_then_restart(tmp_path: Path) -> None:
    upgrade(f"sqlite:///{tmp_path / 'audit.db'}")
    port = free_port()
    series = make_series("kill9", "1.2.826.0.1.3680043.8.498.4242", 1, 60, rows=128)
    acknowledged: list[Dataset] = []
    proc = _serve(tmp_path, port, quiet=600, log_name="serve1.log")

    def sender() -> None:
        ae = AE(ae_title="MODALITY")
        ae.requested_contexts = StoragePresentationContexts[:50]
        assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
        for ds in series:
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, ConnectionError, OSError):
                return
            if "Status" not in rsp:
                return
            if int(rsp.Status) == SUCCESS:
                acknowledged.append(ds)

    thread = threading.Thread(target=sender)
    thread.start()
    wait_for(lambda: len(acknowledged) >= 20, timeout=60, interval=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    thread.join(30)
    assert 20 <= len(acknowledged) < 60, "the kill must land mid-transfer"

    proc = _serve(tmp_path, port, quiet=1, log_name="serve2.log")
    try:
        sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'audit.db'}"))

        def dispatched() -> bool:
            with sessions() as s:
                return s.scalars(select(Study.state)).first() == StudyState.DISPATCHED

        wait_for(dispatched, timeout=60)
        with sessions() as s:
            rows = {r.sop_instance_uid: r.spool_path for r in s.scalars(select(Instance))}
            job = s.scalars(select(Job)).one()
        for ds in acknowledged:
            uid = str(ds.SOPInstanceUID)
            assert uid in rows, f"acknowledged instance {uid} lost"
            spooled = (tmp_path / "spool" / rows[uid]).read_bytes()
            assert dataset_part(spooled) == dataset_part(encode(ds))
        assert len(job.spool_paths) == len(rows)
        assert not list((tmp_path / "spool" / ".tmp").glob("*.part"))
    finally:
        proc.terminate()
        proc.wait(30)


def test_queued_job_is_sent_again_after_restart(tmp_path: Path, redis_url: str) -> None:
    """A job queued to a broker that no worker reads is run by the next node's worker."""
    queue = f"sijnode.test.{uuid.uuid4().hex[:8]}"
    first = node_settings(tmp_path, broker={"url": redis_url, "queue": queue})
    study = make_study("resend", n=3)
    with running_node(first) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3

        def queued() -> list[Job]:
            with node.sessions() as s:
                return list(s.scalars(select(Job).where(Job.dispatched_at.is_not(None))))

        jobs = wait_for(queued)
        assert jobs[0].state == JobState.QUEUED
    # same database and spool, embedded worker this time (no broker)
    second = first.model_copy(update={"broker": first.broker.model_copy(update={"url": ""})})
    with running_node(second, migrate=False) as node:
        assert node.embedded is not None, "no broker: the node runs jobs itself"

        def states() -> list[JobState]:
            with node.sessions() as s:
                return list(s.scalars(select(Job.state)))

        assert wait_for(lambda: states() == [JobState.NO_MODEL])
