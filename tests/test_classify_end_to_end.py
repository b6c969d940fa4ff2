"""End to end: a synthetic study sent by C-STORE yields a recorded result, embedded and on
a real ``sijnode worker`` process on Redis; ``kill -9`` mid-job runs the job again with one
result; a corrupt series and one without geometry are recorded errors, the worker lives.

Real components only: pynetdicom peers, the CT pipeline with seeded ResNeXt-50 weights
(small input size, CPU), Redis and PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.db.migrate import upgrade
from sijnode.db.schema import (
    Job,
    JobState,
    JobTransition,
    ModelRecord,
    ModelSetMember,
    Prediction,
    PredictionDetail,
    Study,
)
from sijnode.models.result import HEATMAPS_NPZ, load_result
from sijnode.models.spec import ModelSpec
from sijnode.synth import generate_ct_study
from sijnode.workers.inference import RESULTS_SUBDIR
from tests.conftest import free_port
from tests.model_files import ct_spec, seeded_checkpoint
from tests.nodes import node_settings, running_node, send, wait_for

SIJNODE = str(Path(sys.executable).parent / "sijnode")


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelSpec]:
    """A CT checkpoint with seeded weights; a low slice threshold so slices are explained."""
    path = tmp_path_factory.mktemp("models") / "ct.safetensors"
    spec = ct_spec(input_size=64)
    spec = spec.with_thresholds(slice_threshold=0.0, study_threshold=0.5)
    return path, seeded_checkpoint(path, spec, seed=11)


def models_of_job_version(session: Session, model_version: str) -> dict[str, ModelRecord]:
    """The model rows a job's ``model_version`` stands for, by role (what an auditor asks)."""
    rows = session.execute(
        select(ModelSetMember.role, ModelRecord)
        .join(ModelRecord, ModelRecord.version == ModelSetMember.model_version)
        .where(ModelSetMember.set_version == model_version)
    ).all()
    return {role: record for role, record in rows}


def _study(index: int, n: int = 6) -> list[Dataset]:
    return generate_ct_study(seed=5, subject_index=index + 1, positive=True, n_slices=n).datasets


def _job_of(sessions: Any, study_uid: str) -> Job | None:
    with sessions() as s:
        return s.scalars(
            select(Job).join(Study).where(Study.study_instance_uid == study_uid)
        ).first()


def _states(sessions: Any, job_id: int) -> list[JobState]:
    with sessions() as s:
        return list(
            s.scalars(
                select(JobTransition.state)
                .where(JobTransition.job_id == job_id)
                .order_by(JobTransition.id)
            )
        )


def _check_result(sessions: Any, job: Job, spec: ModelSpec, n: int, data_dir: Path) -> None:
    """Everything a result records: scores raw and filtered, decision, model rows, timings."""
    with sessions() as s:
        (prediction,) = s.scalars(select(Prediction).where(Prediction.job_id == job.id)).all()
        assert prediction.level == "study"
        assert 0.0 <= prediction.probability <= 1.0
        assert prediction.threshold == 0.5
        assert prediction.aggregation == "median_topk_mean"
        assert prediction.label == (prediction.probability >= 0.5)
        assert len(prediction.slices) == n
        assert all(sl.filtered_score is not None for sl in prediction.slices)
        assert [sl.position_index for sl in prediction.slices] == list(range(n))
        detail = s.scalars(
            select(PredictionDetail).where(PredictionDetail.prediction_id == prediction.id)
        ).one()
        assert detail.decision in ("present", "absent")
        assert detail.device == "cpu" and detail.precision == "fp32"
        assert detail.slice_threshold == 0.0
        assert detail.aggregation_parameters, "aggregation parameters recorded"
        assert detail.algorithm["model_version"] == spec.version
        models = models_of_job_version(s, job.model_version or "")
        assert set(models) == {"model"}
        assert models["model"].spec == spec.model_dump(mode="json")
        row = s.get_one(Job, job.id)
        assert row.model_version == spec.version and row.device == "cpu"
        for stage in ("decode", "preprocess", "infer"):
            assert stage in row.stage_timings, row.stage_timings
        # explanations beside the job's outputs, named by the job key (no identifiers)
        assert detail.result_dir == f"{RESULTS_SUBDIR}/{row.job_key}"
        probability = prediction.probability
    saved = load_result(data_dir / detail.result_dir)  # what the reports step reads
    assert saved.probability == pytest.approx(probability)
    assert saved.explanations and saved.explanations[0].heatmap.dtype == np.uint8
    with np.load(data_dir / detail.result_dir / HEATMAPS_NPZ) as npz:
        assert len(npz.files) == len(saved.explanations)


def test_embedded_worker_records_a_result(tmp_path: Path, ct_model: tuple[Path, ModelSpec]) -> None:
    path, spec = ct_model
    settings = node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        pipelines={"ct": {"model": str(path), "device": "cpu", "batch_size": 4}},
    )
    datasets = _study(0)
    with running_node(settings) as node:
        assert node.embedded is not None
        child = wait_for(lambda: node.embedded.child_pid, timeout=30)
        assert child != os.getpid()  # inference runs in a child process
        assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
        uid = str(datasets[0].StudyInstanceUID)

        def inferred() -> Job | None:
            job = _job_of(node.sessions, uid)
            assert job is None or job.state not in (JobState.FAILED, JobState.NO_MODEL), (
                job.state,
                job.error,
                _states(node.sessions, job.id),
            )
            return job if job is not None and job.state is JobState.REPORTED else None

        job = wait_for(inferred, timeout=240, interval=0.5)
        assert _states(node.sessions, job.id) == [
            JobState.QUEUED,
            JobState.RUNNING,
            JobState.INFERRED,
            JobState.REPORTED,  # no destination configured: it stays reported
        ]
        _check_result(node.sessions, job, spec, len(datasets), tmp_path / "data")
        assert node.embedded.child_pid == child  # models stayed loaded in the same child


def test_embedded_child_killed_mid_job_runs_the_job_again(
    tmp_path: Path, ct_model: tuple[Path, ModelSpec]
) -> None:
    """``kill -9`` of the embedded child: a fresh child runs the job again, one result."""
    path, spec = ct_model
    settings = node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        pipelines={"ct": {"model": str(path), "device": "cpu", "batch_size": 2}},
    )
    datasets = _study(9, n=12)
    with running_node(settings) as node:
        assert node.embedded is not None
        first = wait_for(lambda: node.embedded.child_pid, timeout=60)
        assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
        uid = str(datasets[0].StudyInstanceUID)
        job = wait_for(
            lambda: (
                (j := _job_of(node.sessions, uid)) is not None and j.state is JobState.RUNNING and j
            ),
            timeout=120,
            interval=0.05,
        )
        os.kill(first, signal.SIGKILL)
        job = wait_for(
            lambda: (
                (j := _job_of(node.sessions, uid)) is not None
                and j.state is JobState.REPORTED
                and j
            ),
            timeout=240,
            interval=0.5,
        )
        assert job.attempts == 2
        assert node.embedded.child_pid not in (None, first)
        with node.sessions() as s:
            count = s.scalar(
                select(func.count()).select_from(Prediction).where(Prediction.job_id == job.id)
            )
        assert count == 1
        _check_result(node.sessions, job, spec, len(datasets), tmp_path / "data")


def _maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has libtorch mapped (imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_sijnode_serve_embedded_runs_torch_only_in_its_child(
    tmp_path: Path, ct_model: tuple[Path, ModelSpec]
) -> None:
    """The real ``sijnode serve``: the listener process never maps libtorch; its child does."""
    path, _spec = ct_model
    settings = node_settings(tmp_path)
    upgrade(settings.database.url)
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": settings.database.url,
            "SIJNODE_DATABASE__PSEUDONYM_SECRET": "test-secret",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_DATA_DIR": str(tmp_path / "data"),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_NODE__PORT": str(settings.node.port),
            "SIJNODE_METRICS__PORT": "0",
            "SIJNODE_COMPLETION__QUIET_SECONDS": "1.5",
            "SIJNODE_COMPLETION__CONTENT_QUIET_SECONDS": "0.5",
            "SIJNODE_COMPLETION__CHECK_INTERVAL_SECONDS": "0.2",
            "SIJNODE_PIPELINES__CT__MODEL": str(path),
            "SIJNODE_PIPELINES__CT__DEVICE": "cpu",
        }
    )
    log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [SIJNODE, "serve"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )
    sessions = make_sessionmaker(make_engine(settings.database.url))
    try:

        def children() -> list[int]:
            assert serve.poll() is None, log.read_text()[-4000:]
            tasks = Path(f"/proc/{serve.pid}/task")
            pids = [int(p) for t in tasks.iterdir() for p in (t / "children").read_text().split()]
            return [p for p in pids if _maps_torch(p)]

        (child,) = wait_for(children, timeout=120, interval=0.5)
        datasets = _study(10, n=4)
        wait_for(lambda: _port_open(settings.node.port), timeout=60)
        assert send(datasets, settings.node.port) == [SUCCESS] * len(datasets)
        uid = str(datasets[0].StudyInstanceUID)
        job = wait_for(
            lambda: (
                (j := _job_of(sessions, uid)) is not None
                and j.state in (JobState.REPORTED, JobState.FAILED, JobState.NO_MODEL)
                and j
            ),
            timeout=240,
            interval=0.5,
        )
        assert job.state is JobState.REPORTED, (job.state, job.error, log.read_text()[-3000:])
        assert not _maps_torch(serve.pid), "the listener process imported torch"
        assert _maps_torch(child)
    finally:
        serve.terminate()
        serve.wait(60)


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.gpu
def test_embedded_worker_on_cuda(tmp_path: Path, ct_model: tuple[Path, ModelSpec]) -> None:
    """The same path with ``device = "cuda"``: the device is recorded with the result."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    path, _spec = ct_model
    settings = node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        pipelines={"ct": {"model": str(path), "device": "cuda", "batch_size": 16}},
    )
    datasets = _study(8)
    with running_node(settings) as node:
        assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
        uid = str(datasets[0].StudyInstanceUID)
        job = wait_for(
            lambda: (
                (j := _job_of(node.sessions, uid)) is not None
                and j.state is JobState.REPORTED
                and j
            ),
            timeout=240,
            interval=0.5,
        )
        assert job.device is not None and job.device.startswith("cuda")


class Worker:
    """A real ``sijnode worker`` process with its log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [SIJNODE, "worker", "--queues", "ct", "--device", "cpu"],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-4000:]
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _broker_setup(
    tmp_path: Path, redis_url: str, pg_url: str, model: Path, visibility: float = 7200.0
) -> tuple[Any, dict[str, str]]:
    """Node settings and a worker environment; the worker's spool is another path."""
    upgrade(pg_url)
    queue = f"sijnode.test.{uuid.uuid4().hex[:8]}"
    broker = {"url": redis_url, "queue": queue, "visibility_timeout_seconds": visibility}
    pipelines = {"ct": {"model": str(model), "queue": f"{queue}.ct", "batch_size": 4}}
    settings = node_settings(tmp_path, db_url=pg_url, broker=broker, pipelines=pipelines)
    # the worker sees the same spool mounted at another path (a shared volume, NFS)
    mount = tmp_path / "mnt"
    mount.mkdir()
    (tmp_path / "spool").mkdir(exist_ok=True)
    (mount / "spool").symlink_to(tmp_path / "spool", target_is_directory=True)
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": pg_url,
            "SIJNODE_BROKER__URL": redis_url,
            "SIJNODE_BROKER__QUEUE": queue,
            "SIJNODE_BROKER__VISIBILITY_TIMEOUT_SECONDS": str(visibility),
            "SIJNODE_PIPELINES__CT__MODEL": str(model),
            "SIJNODE_PIPELINES__CT__QUEUE": f"{queue}.ct",
            "SIJNODE_PIPELINES__CT__BATCH_SIZE": "4",
            "SIJNODE_STORAGE__SPOOL_DIR": str(mount / "spool"),
            "SIJNODE_DATA_DIR": str(tmp_path / "data"),
            "SIJNODE_METRICS__PORT": "0",
        }
    )
    return settings, env


def _wait_state(node: Node, worker: Worker, uid: str, state: JobState, timeout: float) -> Job:
    def reached() -> Job | None:
        worker.alive()
        job = _job_of(node.sessions, uid)
        return job if job is not None and job.state is state else None

    return wait_for(reached, timeout=timeout, interval=0.2)  # type: ignore[no-any-return]


def test_worker_process_on_redis_records_results_and_errors(
    tmp_path: Path, redis_url: str, pg_url: str, ct_model: tuple[Path, ModelSpec]
) -> None:
    path, spec = ct_model
    settings, env = _broker_setup(tmp_path, redis_url, pg_url, path)
    metrics_port = free_port()
    env["SIJNODE_METRICS__WORKER_PORT"] = str(metrics_port)
    worker = Worker(env, tmp_path / "worker.log")
    try:
        with running_node(settings, migrate=False) as node:
            assert node.embedded is None
            # a series without geometry, and one whose pixel data is cut short
            no_geometry = _study(1, n=4)
            for ds in no_geometry:
                del ds.ImagePositionPatient
            corrupt = _study(2, n=4)
            corrupt[1].PixelData = corrupt[1].PixelData[:100]
            good = _study(3)
            for datasets in (no_geometry, corrupt, good):
                assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
            uids = [str(d[0].StudyInstanceUID) for d in (no_geometry, corrupt, good)]
            failed = _wait_state(node, worker, uids[0], JobState.FAILED, 240)
            assert "ImagePositionPatient" in (failed.error or ""), failed.error
            broken = _wait_state(node, worker, uids[1], JobState.FAILED, 120)
            assert broken.error, "the corrupt series' job records its error"
            job = _wait_state(node, worker, uids[2], JobState.REPORTED, 120)
            assert worker.alive()  # the worker survived both bad series
            _check_result(node.sessions, job, spec, len(good), tmp_path / "data")
            with node.sessions() as s:
                assert s.scalar(select(func.count()).select_from(Prediction)) == 1
            log = (tmp_path / "worker.log").read_text()
            assert log.count('"models loaded"') == 1, "models load once per worker process"
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            assert 'sijnode_worker_jobs_total{pipeline="ct",state="failed"} 2.0' in text
            assert 'sijnode_worker_jobs_total{pipeline="ct",state="inferred"} 1.0' in text
            assert 'sijnode_worker_stage_seconds_count{pipeline="ct",stage="infer"} 1.0' in text
            assert 'sijnode_worker_model_load_seconds_count{pipeline="ct"} 1.0' in text
    finally:
        worker.stop()


def test_kill_9_mid_job_runs_the_job_again_with_one_result(
    tmp_path: Path, redis_url: str, pg_url: str, ct_model: tuple[Path, ModelSpec]
) -> None:
    path, spec = ct_model
    visibility = 5.0
    settings, env = _broker_setup(tmp_path, redis_url, pg_url, path, visibility)
    # the killed worker's lease lapses after this: then the second worker runs the job
    env["SIJNODE_BROKER__LEASE_SECONDS"] = "6"
    first = Worker(env, tmp_path / "worker-1.log")
    second: Worker | None = None
    try:
        with running_node(settings, migrate=False) as node:
            wait_for(lambda: first.alive() and "models loaded" in first.log.read_text(), 180)
            datasets = _study(4, n=24)
            assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
            uid = str(datasets[0].StudyInstanceUID)
            job = _wait_state(node, first, uid, JobState.RUNNING, 120)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            with node.sessions() as s:
                assert s.get_one(Job, job.id).state is JobState.RUNNING, "killed mid-job"
            # the message comes back once its visibility timeout has passed
            second = Worker(env, tmp_path / "worker-2.log")
            job = _wait_state(node, second, uid, JobState.REPORTED, 240)
            assert job.attempts == 2
            # it ran again because the dead worker's lease lapsed, not as a duplicate
            assert "job lease lapsed" in second.log.read_text()
            states = _states(node.sessions, job.id)
            assert states.count(JobState.RUNNING) == 2 and states[-2:] == [
                JobState.INFERRED,
                JobState.REPORTED,
            ]
            with node.sessions() as s:
                assert (
                    s.scalar(
                        select(func.count())
                        .select_from(Prediction)
                        .where(Prediction.job_id == job.id)
                    )
                    == 1
                )
            time.sleep(visibility + 2)  # no third run once the job is acknowledged
            with node.sessions() as s:
                assert s.get_one(Job, job.id).attempts == 2
            _check_result(node.sessions, job, spec, len(datasets), tmp_path / "data")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_jobs_name_spool_paths_relative_to_the_spool_root(tmp_path: Path) -> None:
    """The job row carries relative paths; the worker resolves them under its own spool."""
    from sijnode.errors import SeriesError
    from sijnode.workers.inference import spool_file

    assert spool_file(Path("/mnt/spool"), "1.2/3.4/5.6.abcd.dcm") == Path(
        "/mnt/spool/1.2/3.4/5.6.abcd.dcm"
    )
    for bad in ("/etc/passwd", "../outside.dcm", ""):
        with pytest.raises(SeriesError, match="relative to the spool root"):
            spool_file(Path("/mnt/spool"), bad)
    settings = node_settings(tmp_path)
    upgrade(settings.database.url)
    sessions = make_sessionmaker(make_engine(settings.database.url))
    with running_node(settings, migrate=False) as node:
        datasets = _study(5, n=3)
        assert send(datasets, node.scp.port) == [SUCCESS] * 3
        job = wait_for(lambda: _job_of(sessions, str(datasets[0].StudyInstanceUID)))
        assert job.spool_paths and all(not Path(p).is_absolute() for p in job.spool_paths)


def test_embedded_mr_study_runs_classifier_and_localizer(tmp_path: Path) -> None:
    """The MR set (ROI classifier + SI-joint localiser) runs and is recorded as a set."""
    from sijnode.synth import generate_mr_study
    from tests.models_support import localizer_checkpoint, mr_checkpoint, truth_boxes

    study = generate_mr_study(seed=5, subject_index=7, positive=True, side="both", n_slices=6)
    models = tmp_path / "models"
    models.mkdir()
    mr_path, mr = mr_checkpoint(models, size=64)
    loc_path, loc = localizer_checkpoint(models, truth_boxes(study), size=64)
    settings = node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        pipelines={
            "mr": {"model": str(mr_path), "localizer": str(loc_path), "device": "cpu"},
        },
    )
    with running_node(settings) as node:
        assert send(study.datasets, node.scp.port) == [SUCCESS] * len(study.datasets)

        def inferred() -> Job | None:
            job = _job_of(node.sessions, study.study_instance_uid)
            assert job is None or job.state not in (JobState.FAILED, JobState.NO_MODEL), (
                job.state,
                job.error,
            )
            return job if job is not None and job.state is JobState.REPORTED else None

        job = wait_for(inferred, timeout=240, interval=0.5)
        assert job.model_version is not None and job.model_version.startswith("mr-set-")
        with node.sessions() as s:
            members = models_of_job_version(s, job.model_version)
            assert {role: m.version for role, m in members.items()} == {
                "model": mr.version,
                "localizer": loc.version,
            }
            (prediction,) = s.scalars(select(Prediction).where(Prediction.job_id == job.id))
            assert prediction.level == "subject"
            assert prediction.aggregation == "median_decisions_mean"
            assert len(prediction.slices) == len(study.datasets)
            detail = s.scalars(
                select(PredictionDetail).where(PredictionDetail.prediction_id == prediction.id)
            ).one()
            assert detail.steps, "localisation and aggregation are recorded steps"
            assert "localise" in s.get_one(Job, job.id).stage_timings
