"""The inference runner: a job's series from the spool, the pipeline's prediction, the audit.

The worker loads each pipeline's models once per process (:func:`warm`, called from
Celery's ``worker_process_init`` and by the embedded child at start) and keeps them; a job
only reads its files and calls ``predict``. A job names its instances relative to the
spool root, and this worker resolves them against its own ``storage.spool_dir``, so a
worker with the spool mounted elsewhere (NFS, another compose volume path) finds them.
The result is recorded through ``db/`` in one transaction (prediction, slice scores raw
and filtered, decision details, model set rows, stage timings, ``inferred``); heatmaps go
with the whole result to ``<data_dir>/results/<job_key>/`` (``result.json``,
``heatmaps.npz``: :func:`sijnode.models.result.save_result`), never into the database.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import SliceScoreInput, record_prediction
from sijnode.db.schema import Job, JobState, Prediction, PredictionDetail
from sijnode.errors import CheckpointError, NoModelError, PipelineError, SeriesError
from sijnode.logs import fields
from sijnode.models.identity import ModelIdentity
from sijnode.workers.model_records import record_model_set, stored_path

if TYPE_CHECKING:
    from sijnode.models.registry import LoadedPipeline, StudyInput
    from sijnode.models.result import PipelineResult
    from sijnode.workers.jobs import WorkerContext

log = logging.getLogger(__name__)

#: Subdirectory of ``data_dir`` with one directory per job key (no patient identifiers).
RESULTS_SUBDIR = "results"


def resolve_device(device: str) -> str:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def warm(ctx: WorkerContext, identity: ModelIdentity) -> LoadedPipeline:
    """The loaded pipeline of ``identity``, loaded on first use and kept for the process."""
    loaded = ctx.loaded.get(identity.version)
    if loaded is not None:
        return loaded
    from sijnode.models.registry import PredictOptions, get_pipeline

    settings = ctx.settings.pipelines[identity.pipeline]
    device = resolve_device(ctx.device or settings.device)
    options = PredictOptions(
        batch_size=settings.batch_size,
        max_explained=settings.gradcam.max_images if settings.gradcam.enabled else 0,
        threshold=settings.threshold,
    )
    started = time.perf_counter()
    try:
        pipeline = get_pipeline(identity.implementation)
        loaded = pipeline.load(identity.checkpoints(), device, options)
    except (CheckpointError, PipelineError, ImportError) as exc:
        raise NoModelError(
            f"pipeline {identity.pipeline!r}: model {identity.version} cannot be loaded: {exc}"
        ) from exc
    with transaction(ctx.sessions) as session:
        record_model_set(session, identity, ctx.settings.data_dir)
    ctx.loaded[identity.version] = loaded
    ctx.metrics.model_load_seconds.labels(pipeline=identity.pipeline).observe(
        time.perf_counter() - started
    )
    log.info(
        "models loaded",
        extra=fields(
            pipeline=identity.pipeline,
            model_version=identity.version,
            device=device,
            seconds=round(time.perf_counter() - started, 3),
        ),
    )
    return loaded


def spool_file(spool_dir: Path, relpath: str) -> Path:
    """The worker's own path of a spooled instance; refuses paths outside the spool."""
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise SeriesError(f"expected an instance path relative to the spool root, got {relpath!r}")
    return spool_dir.joinpath(*rel.parts)


def study_input(ctx: WorkerContext, job: Job, study_instance_uid: str) -> StudyInput:
    """The job's series as absolute paths under this worker's spool."""
    from sijnode.models.registry import StudyInput

    spool_dir = ctx.settings.storage.spool_dir
    paths = [spool_file(spool_dir, rel) for rel in job.spool_paths]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        raise SeriesError(
            f"expected {len(paths)} spooled instances under storage.spool_dir = "
            f"{str(spool_dir)!r}, found {len(paths) - len(missing)} (first missing: "
            f"{job.spool_paths[missing[0]]!r}); is the spool mounted at that path?"
        )
    if len(job.series_uids) != 1:
        raise SeriesError(f"expected one series per job, got {len(job.series_uids)}")
    return StudyInput.from_paths(study_instance_uid, {job.series_uids[0]: paths})


def save_result_files(data_dir: Path, job_key: str, result: PipelineResult) -> Path:
    """``result.json`` and ``heatmaps.npz`` (uint8) in ``<data_dir>/results/<job_key>``.

    Written into a temporary directory that is renamed into place, so a reader (the
    reports step) never sees half a result; a re-run replaces the directory.
    """
    from sijnode.models.result import save_result

    results = data_dir / RESULTS_SUBDIR
    results.mkdir(parents=True, exist_ok=True)
    target = results / job_key
    tmp = results / f".{job_key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_result(result, tmp)
    for name in os.listdir(tmp):
        with (tmp / name).open("rb") as fh:
            os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _level(identity: ModelIdentity) -> str:
    """CT decides per study (Fu et al.: per image, aggregated); MR per subject (Lee et al.)."""
    return "subject" if identity.implementation == "mr" else "study"


def run_inference(ctx: WorkerContext, job: Job, identity: ModelIdentity) -> JobState:
    """Run ``job`` on its pipeline and record the result; the job moves to ``inferred``."""
    started = time.perf_counter()
    loaded = warm(ctx, identity)
    with transaction(ctx.sessions) as session:
        row = session.get_one(Job, job.id)
        study_uid = row.study.study_instance_uid
        job_key = row.job_key
    study = study_input(ctx, job, study_uid)
    result = loaded.predict(study)
    predicted = time.perf_counter()
    result_dir = save_result_files(ctx.settings.data_dir, job_key, result)
    with transaction(ctx.sessions) as session:
        row = session.get_one(Job, job.id, with_for_update=True)
        already = session.scalar(
            select(func.count()).select_from(Prediction).where(Prediction.job_id == row.id)
        )
        if row.state is not JobState.RUNNING or already or row.lease_token != job.lease_token:
            # another delivery of this job got here first, or took the job over after this
            # run's lease lapsed (``job`` is the row as claimed): one result is recorded
            log.warning(
                "result not recorded: the job moved on",
                extra=fields(job_id=row.id, state=row.state.value, predictions=already),
            )
            return row.state
        record_model_set(session, identity, ctx.settings.data_dir)
        if row.model_version is None:  # queued while no model was configured
            row.model_version = identity.version
            row.weights_sha256 = identity.weights_sha256
        relative = stored_path(result_dir, ctx.settings.data_dir)
        prediction = record_prediction(
            session,
            row,
            result.probability,
            result.decision.value == "present",
            result.threshold,
            slice_scores=[
                SliceScoreInput(s.sop_instance_uid, s.score, s.filtered_score)
                for s in result.slices
            ],
            level=_level(identity),
            aggregation=result.aggregation,
        )
        session.add(
            PredictionDetail(
                prediction_id=prediction.id,
                decision=result.decision.value,
                reason=result.reason,
                finding=result.finding.value,
                laterality=result.laterality,
                slice_threshold=result.slice_threshold,
                aggregation_parameters=dict(result.aggregation_parameters),
                steps=dict(result.steps),
                algorithm={
                    "name": result.algorithm.name,
                    "version": result.algorithm.version,
                    "manufacturer": result.algorithm.manufacturer,
                    "parameters": dict(result.algorithm.parameters),
                    "model_version": identity.version,
                    "models": {m.role: m.version for m in identity.members},
                },
                device=result.device,
                precision=result.precision,
                result_dir=relative,
            )
        )
        row.device = result.device
        row.stage_timings = {
            **{k: round(float(v), 6) for k, v in result.stage_seconds.items()},
            "predict_total": round(predicted - started, 6),
            "record": round(time.perf_counter() - predicted, 6),
        }
        detail = f"{result.decision.value} p={result.probability:.4f} model {identity.version}"
        if result.reason:
            detail += f": {result.reason}"
        transition(session, row, JobState.INFERRED, detail)
        stages = dict(row.stage_timings)
    ctx.results[job.id] = result  # for the report step, in this process
    for stage, seconds in stages.items():
        ctx.metrics.stage_seconds.labels(pipeline=identity.pipeline, stage=stage).observe(seconds)
    ctx.metrics.predictions.labels(pipeline=identity.pipeline, decision=result.decision.value).inc()
    log.info(
        "job inferred",
        extra=fields(
            job_id=job.id,
            pipeline=identity.pipeline,
            model_version=identity.version,
            decision=result.decision.value,
            slices=len(result.slices),
            explained=len(result.explanations),
            seconds=round(time.perf_counter() - started, 3),
        ),
    )
    return JobState.INFERRED
