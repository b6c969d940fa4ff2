"""End to end with a real ``sijnode worker`` process on Redis instead of the embedded
worker: a synthetic CT study sent by C-STORE is classified by the worker (which records
the result, builds and records the outputs and queues the delivery), and the node's
delivery loop sends the SR and captures to DCMTK ``storescp``. The worker reads the spool
and writes the outputs through its own paths (another mount of the same directories)."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from pathlib import Path

from pydicom import dcmread

from sijnode.daemon.scp import SUCCESS
from sijnode.db.migrate import upgrade
from sijnode.db.schema import JobState
from sijnode.synth import generate_ct_study
from tests.conftest import free_port
from tests.deliveries import storescp
from tests.end_to_end import (
    MAX_EXPLAINED,
    check_audit,
    check_received,
    ct_model,
    e2e_settings,
    states,
    wait_job,
)
from tests.nodes import running_node, send
from tests.test_classify_end_to_end import Worker


def test_a_worker_process_on_redis_classifies_and_the_node_delivers(
    tmp_path: Path, redis_url: str, pg_url: str
) -> None:
    model, _spec = ct_model(tmp_path / "models")
    upgrade(pg_url)
    port, metrics_port = free_port(), free_port()
    queue = f"sijnode.test.{uuid.uuid4().hex[:8]}"
    settings = e2e_settings(
        tmp_path,
        port,
        db_url=pg_url,
        broker={"url": redis_url, "queue": queue},
        pipelines={"ct": {"model": str(model), "queue": f"{queue}.ct"}},
    )
    # the worker sees the spool and the data directory mounted at other paths
    mount = tmp_path / "mnt"
    mount.mkdir()
    for name in ("spool", "data"):
        (tmp_path / name).mkdir(exist_ok=True)
        (mount / name).symlink_to(tmp_path / name, target_is_directory=True)
    env = {
        **os.environ,
        "SIJNODE_DATABASE__URL": pg_url,
        "SIJNODE_BROKER__URL": redis_url,
        "SIJNODE_BROKER__QUEUE": queue,
        "SIJNODE_PIPELINES__CT__MODEL": str(model),
        "SIJNODE_PIPELINES__CT__QUEUE": f"{queue}.ct",
        "SIJNODE_PIPELINES__CT__BATCH_SIZE": "4",
        "SIJNODE_PIPELINES__CT__GRADCAM__MAX_IMAGES": str(MAX_EXPLAINED),
        "SIJNODE_STORAGE__SPOOL_DIR": str(mount / "spool"),
        "SIJNODE_DATA_DIR": str(mount / "data"),
        "SIJNODE_METRICS__PORT": "0",
        "SIJNODE_METRICS__WORKER_PORT": str(metrics_port),
        "SIJNODE_DESTINATIONS": json.dumps(
            [d.model_dump(mode="json") for d in settings.destinations]
        ),
    }
    study = generate_ct_study(seed=5, subject_index=4, positive=True, n_slices=4).datasets
    uid = str(study[0].StudyInstanceUID)
    worker = Worker(env, tmp_path / "worker.log")
    try:
        with (
            storescp(port, tmp_path / "recv") as out,
            running_node(settings, migrate=False) as node,
        ):
            assert node.embedded is None
            assert send(study, node.scp.port) == [SUCCESS] * len(study)
            job = wait_job(node.sessions, uid, JobState.DELIVERED, timeout=300)
            assert worker.alive()
            assert states(node.sessions, job.id)[-3:] == [
                JobState.INFERRED,
                JobState.REPORTED,
                JobState.DELIVERED,
            ]
            assert job.worker_host, "the worker recorded itself"
            check_audit(node.sessions, job.id, MAX_EXPLAINED)
            received = [(p, dcmread(p)) for p in sorted(out.iterdir()) if p.is_file()]
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                metrics = response.read().decode()
    finally:
        worker.stop()
    check_received(received, study, MAX_EXPLAINED)
    assert 'sijnode_worker_jobs_total{pipeline="ct",state="reported"} 1.0' in metrics
    assert 'sijnode_worker_stage_seconds_count{pipeline="ct",stage="report"} 1.0' in metrics
    log = (tmp_path / "worker.log").read_text()
    assert '"job reported"' in log
