"""Helpers of the end-to-end tests: tiny models, node settings with a destination, checks
of what a destination received (dciodvfy, placement in the original study, references)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select

from sijnode.db.schema import (
    Delivery,
    DeliveryAttempt,
    Job,
    JobState,
    JobTransition,
    Output,
    OutputKind,
    Study,
)
from sijnode.models.spec import ModelSpec, OperatingPoints
from sijnode.settings import Settings
from tests.conftest import require_tool
from tests.model_files import ct_spec, seeded_checkpoint
from tests.nodes import node_settings, wait_for

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
#: Explained slices per study in these tests (captures per job).
MAX_EXPLAINED = 2


def ct_model(out: Path) -> tuple[Path, ModelSpec]:
    """A seeded ResNeXt-50 at 64 px; slice threshold 0 so every slice is positive and the
    top ``MAX_EXPLAINED`` are explained."""
    out.mkdir(parents=True, exist_ok=True)
    spec = ct_spec(input_size=64).with_thresholds(slice_threshold=0.0, study_threshold=0.5)
    path = out / "ct.safetensors"
    return path, seeded_checkpoint(path, spec, seed=11)


def mr_models(out: Path, study: Any) -> tuple[Path, Path]:
    """The MR ROI classifier (slice threshold 0: slices explained) and a localiser that
    finds the study's truth boxes."""
    from tests.models_support import localizer_checkpoint, mr_checkpoint, truth_boxes

    out.mkdir(parents=True, exist_ok=True)
    ops = OperatingPoints(slice_threshold=0.0, subject_threshold=0.5)
    mr_path, _ = mr_checkpoint(out, size=64, operating_points=ops)
    loc_path, _ = localizer_checkpoint(out, truth_boxes(study), size=64)
    return mr_path, loc_path


def e2e_settings(tmp_path: Path, dest_port: int, **overrides: Any) -> Settings:
    """A node with an embedded worker (unless a broker is given) and one destination."""
    dest: dict[str, Any] = {
        "name": "dest",
        "ae_title": "DEST",
        "host": "127.0.0.1",
        "port": dest_port,
    }
    dest.update(overrides.pop("destination", {}))
    gradcam = {"max_images": MAX_EXPLAINED}
    pipelines = overrides.pop("pipelines")
    for p in pipelines.values():
        p.setdefault("device", "cpu")
        p.setdefault("batch_size", 4)
        p.setdefault("gradcam", gradcam)
    delivery = {"check_interval_seconds": 0.2, "backoff_seconds": 0.5}
    delivery.update(overrides.pop("delivery", {}))
    return node_settings(
        tmp_path,
        data_dir=str(tmp_path / "data"),
        pipelines=pipelines,
        destinations=[dest],
        delivery=delivery,
        **overrides,
    )


def job_of(sessions: Any, study_uid: str, newest: bool = False) -> Job | None:
    """The (first or newest) job of the study ``study_uid``."""
    with sessions() as s:
        query = select(Job).join(Study).where(Study.study_instance_uid == study_uid)
        return s.scalars(query.order_by(Job.id.desc() if newest else Job.id)).first()


def wait_job(
    sessions: Any, study_uid: str, state: JobState, timeout: float = 300, newest: bool = False
) -> Job:
    """Wait for the study's job to reach ``state``; fail at once on failed / no_model."""

    def reached() -> Job | None:
        job = job_of(sessions, study_uid, newest)
        if job is not None and job.state in (JobState.FAILED, JobState.NO_MODEL):
            raise AssertionError(f"job {job.id} is {job.state.value}: {job.error}")
        return job if job is not None and job.state is state else None

    return wait_for(reached, timeout=timeout, interval=0.3)  # type: ignore[no-any-return]


def states(sessions: Any, job_id: int) -> list[JobState]:
    with sessions() as s:
        return list(
            s.scalars(
                select(JobTransition.state)
                .where(JobTransition.job_id == job_id)
                .order_by(JobTransition.id)
            )
        )


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines of dciodvfy for one file."""
    check = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120
    )
    return [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]


def check_received(
    received: list[tuple[Path, Dataset]], source: list[Dataset], captures: int
) -> Dataset:
    """Every received object is validator-clean and in the source study; the SR copies the
    patient module and references every source image and every capture. Returns the SR."""
    for path, _ds in received:
        assert dciodvfy_errors(path) == [], path
    srs = [ds for _, ds in received if str(ds.SOPClassUID).startswith(SR_PREFIX)]
    scs = [ds for _, ds in received if ds.SOPClassUID == SC_CLASS]
    assert len(srs) == 1, [str(ds.SOPClassUID) for _, ds in received]
    assert len(scs) == captures
    (sr,) = srs
    first = source[0]
    for ds in (sr, *scs):
        assert ds.StudyInstanceUID == first.StudyInstanceUID
        assert ds.PatientID == first.PatientID and ds.PatientName == first.PatientName
        assert ds.SeriesInstanceUID != first.SeriesInstanceUID  # a new series
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {str(ds.SOPInstanceUID) for ds in source} <= referenced
    assert {str(ds.SOPInstanceUID) for ds in scs} <= referenced
    source_uids = {str(ds.SOPInstanceUID) for ds in source}
    for sc in scs:
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in source_uids
    return sr


def check_audit(sessions: Any, job_id: int, captures: int) -> None:
    """The audit has the job's outputs (SR + captures) and its delivery attempts."""
    with sessions() as s:
        outputs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
        kinds = sorted(OutputKind(o.kind).value for o in outputs)
        assert kinds.count("sr") == 1 and kinds.count("sc") == captures, kinds
        assert all(o.path and not Path(o.path).is_absolute() for o in outputs)
        attempts = s.scalar(
            select(func.count())
            .select_from(DeliveryAttempt)
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(Delivery.job_id == job_id)
        )
        assert attempts and attempts >= 1
        job = s.get_one(Job, job_id)
        assert "report" in job.stage_timings, job.stage_timings
