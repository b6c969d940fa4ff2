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
from sqlalchemy import func, select

from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.db.migrate import upgrade
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
)
from tests.conftest import free_port, require_tool
from tests.nodes import (  # noqa: F401 - receive_mode: a fixture
    current_receive_mode,
    node_settings,
    receive_mode,
    running_node,
    send,
    wait_for,
)
from tests.studies import dataset_part, encode, make_series, make_study, write

SIJNODE = str(Path(sys.executable).parent / "sijnode")


def _serve(
    tmp_path: Path, port: int, quiet: float, log_name: str, **extra: str
) -> subprocess.Popen[bytes]:
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
            **extra,
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
        # The killed association's row was left active; recovery closed it with the
        # count of the instance rows it stored (every acknowledged one among them).
        with sessions() as s:
            (killed,) = s.scalars(
                select(Association).where(Association.calling_ae_title == "MODALITY")
            ).all()
            stored = s.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.association_id == killed.id)
            )
        assert killed.outcome is AssociationOutcome.ABORTED
        assert killed.ended_at is not None
        assert killed.instances_received == stored >= len(acknowledged)
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


def test_sigterm_mid_transfer_answers_cleanly_and_exits(tmp_path: Path) -> None:
    """SIGTERM while storescu sends a large study: the port closes, the instance in flight
    is answered, the association is aborted after the grace period, and the node exits 0
    with every acknowledged instance in the spool and the audit, and no traceback."""
    storescu = require_tool("storescu")
    upgrade(f"sqlite:///{tmp_path / 'audit.db'}")
    port = free_port()
    # enough that the grace period ends mid-transfer: the node answers in about a
    # millisecond an instance on an idle machine
    series = make_series("sigterm", "1.2.826.0.1.3680043.8.498.4243", 1, 1000, rows=256)
    files = write(series, tmp_path / "study")
    uid_of = {str(path): str(ds.SOPInstanceUID) for path, ds in zip(files, series, strict=True)}
    proc = _serve(
        tmp_path, port, quiet=600, log_name="serve.log", SIJNODE_NODE__STOP_GRACE_SECONDS="0.2"
    )
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    sender_log = (tmp_path / "storescu.log").open("wb")
    sender = subprocess.Popen(
        [storescu, "-v", "-aec", "SIJNODE", "127.0.0.1", str(port), *map(str, files)],
        stdout=sender_log,
        stderr=subprocess.STDOUT,
    )
    try:

        def stored() -> int:
            with sessions() as s:
                return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

        wait_for(lambda: stored() >= 30, timeout=120, interval=0.02)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        exited = time.monotonic() - signalled
        sender.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if sender.poll() is None:
            sender.kill()
    acknowledged: list[str] = []
    current = ""
    for line in (tmp_path / "storescu.log").read_text().splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif line.startswith("I: Received Store Response (Success)"):
            acknowledged.append(uid_of[current])
    assert 30 <= len(acknowledged) < len(series), "SIGTERM must land mid-transfer"
    assert exited < 15, f"the node took {exited:.1f} s to exit after SIGTERM"
    with sessions() as s:
        rows = {r.sop_instance_uid: r.spool_path for r in s.scalars(select(Instance))}
        refused = list(s.scalars(select(Event).where(Event.type == EventType.INSTANCE_REFUSED)))
        (assoc,) = s.scalars(select(Association).where(Association.calling_ae_title == "STORESCU"))
    for uid in acknowledged:
        assert uid in rows, f"acknowledged instance {uid} is not in the audit"
        assert (tmp_path / "spool" / rows[uid]).is_file(), f"{uid} is not in the spool"
    statuses = {e.detail.get("status") for e in refused}
    assert statuses <= {"0xA700"}, statuses
    assert assoc.outcome is AssociationOutcome.ABORTED
    assert assoc.instances_received == len(rows) >= len(acknowledged)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "0x0110" not in log, log[-3000:]
    assert "stopping: aborting open associations" in log
    assert '"message": "stopping", "signal": "SIGTERM"' in log and '"message": "stopped"' in log
    assert not list((tmp_path / "spool" / ".tmp").glob("*.part"))
