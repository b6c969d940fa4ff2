"""The report step of a job: ``inferred`` → ``reported`` (or ``shadow``), deliveries queued.

Runs in the worker right after the result is recorded, with the
:class:`~sijnode.models.result.PipelineResult` still in memory (heatmaps included); after a
restart or a lost worker, a job left ``inferred`` is sent again and its result is read
back from ``<data_dir>/results/<job_key>/`` (:func:`sijnode.models.result.load_result`).
:func:`sijnode.reports.build.build_outputs` makes the SR, one secondary capture per
explained slice (Grad-CAM on) and the KOS (``reports.kos``); they are written to
``<data_dir>/outputs/<job_key>/`` (the job key is a content hash: no patient identifier in
the path), recorded with :func:`~sijnode.db.records.record_output`, the job moves to
``reported`` and its deliveries are created with the delivery package's own
:func:`~sijnode.delivery.scheduler.enqueue_job` (one per destination of the route, or of
every destination; shadow mode moves the job to ``shadow`` and sends nothing). The SR goes
in the first class of ``reports.sr_sop_classes``; the delivery SCU re-encodes it to the
class a destination accepted. A job that supersedes an earlier one whose SR was written
names that SR in the Predecessor Documents Sequence (PS3.3 C.17.2). Building the same
job again gives the same UIDs (:mod:`sijnode.reports.uids`), so a re-run is harmless.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import record_output
from sijnode.db.schema import (
    Job,
    JobState,
    Output,
    OutputKind,
    Prediction,
    PredictionDetail,
)
from sijnode.errors import ReportError, SijnodeError, UnknownJobError
from sijnode.logs import fields
from sijnode.workers.finish import finish_job

if TYPE_CHECKING:
    from sijnode.models.result import PipelineResult
    from sijnode.workers.jobs import WorkerContext

log = logging.getLogger(__name__)

#: Subdirectory of ``data_dir`` with one directory of DICOM outputs per job key.
OUTPUTS_SUBDIR = "outputs"

_KIND_OF_STEM = {"sr": OutputKind.SR, "sc": OutputKind.SC, "ko": OutputKind.KOS}


def warm_reports() -> None:
    """Import the report builders (highdicom, OpenCV) before the first job needs them."""
    import sijnode.reports.build
    import sijnode.reports.sc  # noqa: F401 - imported for its side effect: loaded once


def outputs_dir(data_dir: Path, job_key: str) -> Path:
    """``<data_dir>/outputs/<job_key>``: where a job's SR, captures and KOS are written."""
    return data_dir / OUTPUTS_SUBDIR / job_key


def saved_result(session: Session, job: Job, data_dir: Path) -> PipelineResult:
    """The job's result as the runner saved it (``result.json`` and ``heatmaps.npz``)."""
    from sijnode.models.result import load_result

    detail = session.scalars(
        select(PredictionDetail)
        .join(Prediction, Prediction.id == PredictionDetail.prediction_id)
        .where(Prediction.job_id == job.id)
        .order_by(PredictionDetail.id.desc())
    ).first()
    if detail is None or not detail.result_dir:
        raise ReportError(f"expected a saved result of job {job.id}, the audit names none")
    directory = data_dir / detail.result_dir
    try:
        return load_result(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ReportError(
            f"expected the saved result of job {job.id} under {detail.result_dir!r}: {exc}"
        ) from exc


def predecessor_sr(session: Session, job: Job) -> Dataset | None:
    """The latest SR written for an earlier job of the same study and pipeline (the one this
    job supersedes, or the last one of its chain that got as far as an SR), if any."""
    from sijnode.reports.sr import predecessor_reference

    row = (
        session.execute(
            select(Output)
            .join(Job, Job.id == Output.job_id)
            .where(
                Job.study_id == job.study_id,
                Job.pipeline == job.pipeline,
                Job.id < job.id,
                Output.kind == OutputKind.SR,
            )
            .order_by(Job.id.desc(), Output.id.desc())
        )
        .scalars()
        .first()
    )
    if row is None:
        return None
    return predecessor_reference(
        job.study.study_instance_uid,
        row.series_instance_uid,
        row.sop_class_uid,
        row.sop_instance_uid,
    )


def report_job(ctx: WorkerContext, job_id: int, result: PipelineResult | None = None) -> JobState:
    """Build, write and record the outputs of an ``inferred`` job; queue its deliveries.

    ``result`` is the in-memory result of the run that just ended; None reads the saved
    one. A job in any other state is left as it is (a re-delivered message). Any error
    of the step (a :class:`ReportError`, an unreadable saved result, a bug of a builder,
    a delivery that cannot be queued) fails the job with the reason (``report: ...``);
    the worker goes on.
    """
    with transaction(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise UnknownJobError(f"expected job {job_id} in the audit database, found no such job")
        if job.state is not JobState.INFERRED:
            return JobState(job.state)
        pipeline = job.pipeline
    try:
        return _report(ctx, job_id, result)
    except SijnodeError as exc:  # a missing saved result, an unreadable source, ...
        log.error("report not built", extra=fields(job_id=job_id, error=str(exc)))
        return _fail(ctx, job_id, pipeline, f"report: {exc}")
    except Exception as exc:  # a builder bug or any other error fails the job, not the worker
        log.exception("report raised", extra=fields(job_id=job_id))
        return _fail(ctx, job_id, pipeline, f"report: {type(exc).__name__}: {exc}")


def _report(ctx: WorkerContext, job_id: int, result: PipelineResult | None) -> JobState:
    """The body of :func:`report_job`; any error it raises fails the job there."""
    from sijnode.delivery.scheduler import enqueue_job
    from sijnode.reports.build import build_outputs
    from sijnode.workers.inference import spool_file

    settings = ctx.settings
    started = time.perf_counter()
    with transaction(ctx.sessions) as session:
        job = session.get_one(Job, job_id)
        if job.state is not JobState.INFERRED:
            return JobState(job.state)
        pipeline, job_key = job.pipeline, job.job_key
        if result is None:
            result = saved_result(session, job, settings.data_dir)
        predecessor = predecessor_sr(session, job)
        sources = [spool_file(settings.storage.spool_dir, p) for p in job.spool_paths]
    target = outputs_dir(settings.data_dir, job_key)
    bundle = build_outputs(result, sources, job_key, settings, predecessor=predecessor)
    built = time.perf_counter()
    paths = bundle.write(target)  # atomic renames; a re-run writes the same objects
    written = time.perf_counter()
    timings = {f"report_{k}": round(v, 6) for k, v in bundle.seconds.items()}
    timings["report_write"] = round(written - built, 6)
    timings["report"] = round(written - started, 6)
    with transaction(ctx.sessions) as session:
        job = session.get_one(Job, job_id, with_for_update=True)
        if job.state is not JobState.INFERRED:
            log.warning(
                "outputs not recorded: the job moved on",
                extra=fields(job_id=job_id, state=job.state.value),
            )
            return JobState(job.state)
        known = set(
            session.scalars(select(Output.sop_instance_uid).where(Output.job_id == job_id)).all()
        )
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if str(ds.SOPInstanceUID) in known:
                continue
            record_output(
                session,
                job,
                _KIND_OF_STEM[path.stem.split("-")[0]],
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                str(path.relative_to(settings.data_dir)),
            )
        job.stage_timings = {**(job.stage_timings or {}), **timings}
        superseding = " (supersedes an earlier SR)" if predecessor is not None else ""
        transition(
            session,
            job,
            JobState.REPORTED,
            f"SR, {len(bundle.captures)} captures"
            + (", KOS" if bundle.kos is not None else "")
            + superseding,
        )
        deliveries = enqueue_job(session, settings, job)
        final = JobState(job.state)
    ctx.metrics.stage_seconds.labels(pipeline=pipeline, stage="report").observe(timings["report"])
    ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
    log.info(
        "job reported",
        extra=fields(
            job_id=job_id,
            pipeline=pipeline,
            state=final.value,
            outputs=len(paths),
            captures=len(bundle.captures),
            superseding=predecessor is not None,
            deliveries=len(deliveries),
            seconds=timings["report"],
        ),
    )
    return final


def _fail(ctx: WorkerContext, job_id: int, pipeline: str, reason: str) -> JobState:
    final = finish_job(ctx.sessions, job_id, JobState.FAILED, reason)
    log.error("job report failed", extra=fields(job_id=job_id, error=reason))
    ctx.metrics.jobs.labels(pipeline=pipeline, state=final.value).inc()
    return final
