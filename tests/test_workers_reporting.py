"""The report step of the worker, on a real audit (SQLite) and real files: a job left
``inferred`` (its worker was lost between the steps) is reported from its saved result;
shadow mode records the deliveries and sends nothing; a missing result or a bad input
fails the job with the reason and the worker goes on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.records import record_prediction
from sijnode.db.schema import (
    Delivery,
    DeliveryStatus,
    Job,
    JobState,
    Output,
    OutputKind,
    PredictionDetail,
    Study,
)
from sijnode.errors import UnknownJobError
from sijnode.settings import Settings, load_settings
from sijnode.workers.context import make_worker_context
from sijnode.workers.inference import RESULTS_SUBDIR, save_result_files
from sijnode.workers.jobs import WorkerContext, execute_job
from sijnode.workers.messages import JobMessage
from sijnode.workers.reporting import outputs_dir, report_job
from tests.nodes import wait_for
from tests.test_reports_inputs import Case, ct_case


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "database": {"url": f"sqlite:///{tmp_path / 'audit.db'}"},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
        "data_dir": str(tmp_path / "data"),
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
    }
    base.update(overrides)
    settings = load_settings(overrides=base)
    upgrade(settings.database.url)
    return settings


def _inferred_job(ctx: WorkerContext, case: Case, save: bool = True) -> int:
    """A CT job in ``inferred`` whose inputs are the case's files in the spool."""
    settings = ctx.settings
    spool = settings.storage.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    rels = []
    for path in case.paths:
        rel = f"s/{path.name}"
        (spool / "s").mkdir(exist_ok=True)
        (spool / rel).write_bytes(path.read_bytes())
        rels.append(rel)
    result_dir = None
    if save:
        written = save_result_files(settings.data_dir, case.job_key, case.result)
        result_dir = str(written.relative_to(settings.data_dir))
    with transaction(ctx.sessions) as s:
        study = Study(study_instance_uid=case.study.study_instance_uid, site="test")
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            job_key=case.job_key,
            route="ct",
            pipeline="ct",
            series_uids=[case.study.series_instance_uid],
            spool_paths=rels,
        )
        s.add(job)
        s.flush()
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED):
            transition(s, job, state)
        prediction = record_prediction(s, job, case.result.probability, True, 0.5)
        s.add(
            PredictionDetail(
                prediction_id=prediction.id,
                decision=case.result.decision.value,
                finding=case.result.finding.value,
                slice_threshold=0.5,
                device="cpu",
                precision="fp32",
                result_dir=result_dir,
            )
        )
        return job.id


def test_an_inferred_job_is_reported_from_its_saved_result(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ctx = make_worker_context(settings)
    case = ct_case(tmp_path / "src", n_slices=6, n_explained=2)
    job_id = _inferred_job(ctx, case)
    assert execute_job(ctx, job_id) is JobState.REPORTED
    folder = outputs_dir(settings.data_dir, case.job_key)
    assert sorted(p.name for p in folder.iterdir()) == ["sc-1.dcm", "sc-2.dcm", "sr-1.dcm"]
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        outputs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
        (delivery,) = s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        assert delivery.destination == "pacs" and delivery.status is DeliveryStatus.PENDING
        assert job.attempts in (0, None), "reporting is not another run of the pipeline"
        assert job.stage_timings["report"] > 0 and "report_sr" in job.stage_timings
    kinds = sorted(OutputKind(o.kind).value for o in outputs)
    assert kinds == ["sc", "sc", "sr"]
    for out in outputs:
        ds = pydicom.dcmread(settings.data_dir / out.path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == out.sop_instance_uid
        assert ds.StudyInstanceUID == case.study.study_instance_uid
        assert out.path.startswith(f"outputs/{case.job_key}/")
    # a second message for the same job changes nothing
    assert execute_job(ctx, job_id) is JobState.REPORTED
    with ctx.sessions() as s:
        assert len(s.scalars(select(Output).where(Output.job_id == job_id)).all()) == 3


def test_shadow_mode_reports_and_sends_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path, delivery={"shadow_mode": True})
    ctx = make_worker_context(settings)
    job_id = _inferred_job(ctx, ct_case(tmp_path / "src", n_slices=4, n_explained=1))
    assert execute_job(ctx, job_id) is JobState.SHADOW
    with ctx.sessions() as s:
        (delivery,) = s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        assert delivery.status is DeliveryStatus.SHADOW and delivery.attempts == 0
        (attempt,) = delivery.attempt_log
        assert attempt.outcome == "shadow"
        assert len(attempt.sop_instance_uids) == 2  # what would have been sent: SR + 1 SC


def test_a_missing_saved_result_fails_the_job_with_the_reason(tmp_path: Path) -> None:
    ctx = make_worker_context(_settings(tmp_path))
    job_id = _inferred_job(ctx, ct_case(tmp_path / "src", n_slices=4), save=False)
    assert execute_job(ctx, job_id) is JobState.FAILED
    with ctx.sessions() as s:
        error = s.get_one(Job, job_id).error or ""
    assert "expected a saved result" in error


def test_a_report_error_fails_the_job_and_the_worker_goes_on(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ctx = make_worker_context(settings)
    case = ct_case(tmp_path / "src", n_slices=4, n_explained=1)
    job_id = _inferred_job(ctx, case)
    with transaction(ctx.sessions) as s:  # the explained slice is not among the inputs
        job = s.get_one(Job, job_id)
        explained = case.result.explanations[0].sop_instance_uid
        keep = [
            p
            for p, path in zip(job.spool_paths, case.paths, strict=True)
            if pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID != explained
        ]
        job.spool_paths = keep
    assert execute_job(ctx, job_id) is JobState.FAILED
    with ctx.sessions() as s:
        error = s.get_one(Job, job_id).error or ""
    assert error.startswith("report: ") and "explained slice" in error
    assert not (settings.data_dir / RESULTS_SUBDIR / "missing").exists()
    # the next job is reported as usual
    other = ct_case(tmp_path / "src2", n_slices=4, subject=3, n_explained=1)
    assert execute_job(ctx, _inferred_job(ctx, other)) is JobState.REPORTED


def test_a_node_that_starts_reports_and_delivers_a_job_left_inferred(tmp_path: Path) -> None:
    """A worker died between inference and report: at start-up the node's reconciler
    sends the job again, it is reported from its saved result and delivered."""
    from tests.conftest import free_port
    from tests.deliveries import received, storescp
    from tests.nodes import node_settings, running_node, send, wait_for

    port = free_port()
    settings = node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
        delivery={"check_interval_seconds": 0.2},
    )
    case = ct_case(tmp_path / "src", n_slices=4, n_explained=1)
    with running_node(settings) as node:  # no model: the job waits in no_model
        assert send(case.study.datasets, node.scp.port) == [0] * 4

        def waiting() -> int | None:
            with node.sessions() as s:
                job = s.scalars(select(Job)).first()
                return job.id if job is not None and job.state is JobState.NO_MODEL else None

        job_id = wait_for(waiting, timeout=60)
    # what a worker that died after recording its result leaves behind
    written = save_result_files(settings.data_dir, "left-inferred", case.result)
    ctx = make_worker_context(settings)
    with transaction(ctx.sessions) as s:
        job = s.get_one(Job, job_id)
        transition(s, job, JobState.RUNNING)
        transition(s, job, JobState.INFERRED)
        prediction = record_prediction(s, job, case.result.probability, True, 0.5)
        s.add(
            PredictionDetail(
                prediction_id=prediction.id,
                decision=case.result.decision.value,
                finding=case.result.finding.value,
                slice_threshold=0.5,
                device="cpu",
                precision="fp32",
                result_dir=str(written.relative_to(settings.data_dir)),
            )
        )
    with storescp(port, tmp_path / "recv") as out, running_node(settings, migrate=False) as node:

        def delivered() -> bool:
            with node.sessions() as s:
                job = s.get_one(Job, job_id)
                assert job.state is not JobState.FAILED, job.error
                return job.state is JobState.DELIVERED

        wait_for(delivered, timeout=240, interval=0.2)  # the report is built in a child
        got = received(out)
    assert sorted(str(ds.SOPClassUID) for ds in got) == [
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.88.33",
    ]


def _break_saved_result(ctx: WorkerContext, case: Case, monkeypatch: pytest.MonkeyPatch) -> str:
    """A result.json whose slices are not a list: its reader raises TypeError."""
    path = ctx.settings.data_dir / RESULTS_SUBDIR / case.job_key / "result.json"
    data = json.loads(path.read_text())
    data["slices"] = 5
    path.write_text(json.dumps(data))
    return "report: TypeError: "


def _break_builder(ctx: WorkerContext, case: Case, monkeypatch: pytest.MonkeyPatch) -> str:
    """A bug in the SR/SC builders (not a ReportError)."""
    import sijnode.reports.build

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("builder bug")

    monkeypatch.setattr(sijnode.reports.build, "build_outputs", broken)
    return "report: ZeroDivisionError: builder bug"


def _break_deliveries(ctx: WorkerContext, case: Case, monkeypatch: pytest.MonkeyPatch) -> str:
    """The deliveries cannot be queued, after the outputs were written."""
    import sijnode.delivery.scheduler

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("no such destination")

    monkeypatch.setattr(sijnode.delivery.scheduler, "enqueue_job", broken)
    return "report: KeyError: 'no such destination'"


@pytest.mark.parametrize("inject", [_break_saved_result, _break_builder, _break_deliveries])
def test_an_unexpected_error_of_the_report_step_fails_the_job_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject: Any
) -> None:
    """Any exception of the report step, at each point it can happen, moves the job from
    ``inferred`` to ``failed`` with the reason (never left ``inferred``); nothing of it is
    recorded, and the worker reports the next job as usual."""
    ctx = make_worker_context(_settings(tmp_path))
    case = ct_case(tmp_path / "src", n_slices=4, n_explained=1)
    job_id = _inferred_job(ctx, case)
    with monkeypatch.context() as patch:
        expected = inject(ctx, case, patch)
        assert report_job(ctx, job_id) is JobState.FAILED
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.FAILED
        assert (job.error or "").startswith(expected), job.error
        assert s.scalars(select(Output).where(Output.job_id == job_id)).all() == []
        assert s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all() == []
    other = ct_case(tmp_path / "src2", n_slices=4, subject=3, n_explained=1)
    assert execute_job(ctx, _inferred_job(ctx, other)) is JobState.REPORTED


def _queued_job(ctx: WorkerContext, key: str) -> int:
    with transaction(ctx.sessions) as s:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", site="t")
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, job_key=key, route="r", pipeline="ct", spool_paths=[])
        s.add(job)
        s.flush()
        transition(s, job, JobState.QUEUED)
        return job.id


def test_an_unexpected_error_outside_the_pipeline_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of the job code itself (here the input check raising something else than
    MixedInputsError) fails the job with the reason instead of leaving it queued."""
    import sijnode.workers.jobs

    ctx = make_worker_context(_settings(tmp_path))
    job_id = _queued_job(ctx, "broken")

    def broken(session: object, job: Job) -> None:
        raise AttributeError("input check bug")

    with monkeypatch.context() as patch:
        patch.setattr(sijnode.workers.jobs, "check_job_inputs", broken)
        assert execute_job(ctx, job_id) is JobState.FAILED
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.FAILED
        assert job.error == "AttributeError: input check bug"
    assert execute_job(ctx, _queued_job(ctx, "next")) is JobState.NO_MODEL
    with pytest.raises(UnknownJobError, match="expected job 999999 in the audit database"):
        execute_job(ctx, 999_999)  # nothing to fail: the caller hears of it
    with pytest.raises(UnknownJobError, match="found no such job"):
        report_job(ctx, 999_999)


def test_the_embedded_feeder_fails_a_job_whose_run_raised_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feeder (no model: it runs the bookkeeping itself) survives a run that raised
    and an ``on_done`` callback that raised; the job is failed with the reason."""
    import sijnode.workers.embedded as embedded

    ctx = make_worker_context(_settings(tmp_path))
    broken_id = _queued_job(ctx, "broken")
    next_id = _queued_job(ctx, "next")
    real = embedded.execute_job

    def execute(c: WorkerContext, job_id: int) -> JobState:
        if job_id == broken_id:
            raise TypeError("worker bug")
        return real(c, job_id)

    done: list[int] = []

    def on_done(job_id: int) -> None:
        done.append(job_id)
        if job_id == broken_id:
            raise RuntimeError("callback bug")

    monkeypatch.setattr(embedded, "execute_job", execute)
    worker = embedded.EmbeddedWorker(ctx)
    worker.on_done = on_done
    worker.start()
    try:
        for job_id in (broken_id, next_id):
            worker.send(JobMessage(job_id=job_id, pipeline="ct", spool_paths=[]))
        wait_for(lambda: len(done) == 2, timeout=30)
    finally:
        worker.stop()
    assert worker.child_pid is None, "no model: no child"
    with ctx.sessions() as s:
        broken = s.get_one(Job, broken_id)
        assert broken.state is JobState.FAILED
        assert broken.error == "embedded worker: TypeError: worker bug"
        assert s.get_one(Job, next_id).state is JobState.NO_MODEL


def test_the_embedded_child_answers_an_error_and_runs_the_next_job(tmp_path: Path) -> None:
    """The real child process: a job it cannot run is answered as an error with the
    reason, and the same child runs the next job."""
    from sijnode.workers.embedded import _Child

    settings = _settings(tmp_path)
    ctx = make_worker_context(settings)
    job_id = _queued_job(ctx, "child")
    child = _Child(settings.model_dump_json(), None)
    try:
        state, error = child.run(999_999) or ("died", None)
        assert state == "error" and "expected job 999999 in the audit" in (error or "")
        pid = child.process.pid
        assert child.run(job_id) == (JobState.NO_MODEL.value, None)
        assert child.process.pid == pid and child.process.is_alive()
    finally:
        child.stop(30)


def test_a_report_only_job_is_built_in_the_embedded_child_not_the_listener(
    tmp_path: Path,
) -> None:
    """A job left ``inferred`` whose model is gone: the feeder hands it to a child (started
    for it), which builds and records the report; the listener's own context built none."""
    from sijnode.workers.embedded import EmbeddedWorker

    ctx = make_worker_context(_settings(tmp_path))
    job_id = _inferred_job(ctx, ct_case(tmp_path / "src", n_slices=4, n_explained=1))
    waiting = _queued_job(ctx, "no-model")
    worker = EmbeddedWorker(ctx)
    done: list[int] = []
    worker.on_done = done.append
    worker.start()
    try:
        assert worker.child_pid is None, "no pipeline has a model: no child at start"
        worker.send(JobMessage(job_id=waiting, pipeline="ct", spool_paths=[]))
        wait_for(lambda: done == [waiting], timeout=30)
        assert worker.child_pid is None, "no_model bookkeeping needs no child"
        worker.send(JobMessage(job_id=job_id, pipeline="ct", spool_paths=[]))
        wait_for(lambda: len(done) == 2, timeout=240)
        assert worker.child_pid is not None, "the report ran in a child"
    finally:
        worker.stop()
    with ctx.sessions() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.REPORTED, job.error
        assert len(s.scalars(select(Output).where(Output.job_id == job_id)).all()) == 2
        assert s.get_one(Job, waiting).state is JobState.NO_MODEL
    reports_here = ctx.metrics.registry.get_sample_value(
        "sijnode_worker_stage_seconds_count", {"pipeline": "ct", "stage": "report"}
    )
    assert not reports_here, "the listener's context built a report"
