"""Writing audit rows: the one API that the listener, workers and delivery use.

Every function works inside the caller's session and transaction (see
:func:`sijnode.db.engine.transaction`) and appends its event to the ``events`` trail in
that same transaction, so a state change and its audit record commit or fail together.
Nothing here commits. State changes go through :mod:`sijnode.db.lifecycle`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.engine import record_event
from sijnode.db.lifecycle import TERMINAL_JOB_STATES as TERMINAL_JOB_STATES  # re-exported
from sijnode.db.lifecycle import transition
from sijnode.db.schema import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EventType,
    Job,
    JobState,
    Output,
    OutputKind,
    Prediction,
    SliceScore,
    as_utc,
    utcnow,
)

#: Prediction levels the audit knows; ``study`` and ``subject`` feed the metrics.
PREDICTION_LEVELS = ("study", "subject", "series")


class SliceScoreInput(NamedTuple):
    """One slice's score as handed to :func:`record_prediction`, in slice order."""

    sop_instance_uid: str
    score: float
    filtered_score: float | None = None


def _when(at: datetime | None) -> datetime:
    return utcnow() if at is None else as_utc(at)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"expected {name} between 0 and 1, got {value!r}")
    return value


def _extra(**detail: Any) -> dict[str, Any]:
    """Event detail without the empty entries."""
    return {k: v for k, v in detail.items() if v not in (None, "", [])}


def _ensure_id(session: Session, job: Job) -> int:
    if job.id is None:
        session.add(job)
        session.flush()
    return job.id


def mark_dispatched(
    session: Session, job: Job, *, task_id: str | None = None, at: datetime | None = None
) -> None:
    """Record that ``job`` was handed to the queue: ``dispatched_at`` and JOB_DISPATCHED."""
    when = _when(at)
    job_id = _ensure_id(session, job)
    job.dispatched_at = when
    job.updated_at = when
    event = record_event(
        session,
        EventType.JOB_DISPATCHED,
        study_id=job.study_id,
        job_id=job_id,
        **_extra(task_id=task_id),
    )
    event.at = when


def supersede_job(
    session: Session, old: Job, new: Job, reason: str = "", *, at: datetime | None = None
) -> None:
    """Mark ``old`` superseded by ``new`` (late images, re-run): state, link and event."""
    when = _when(at)
    new_id = _ensure_id(session, new)
    old_id = _ensure_id(session, old)
    if old_id == new_id:
        raise ValueError(f"a job cannot supersede itself (job {old_id})")
    old.superseded_by_id = new_id
    transition(session, old, JobState.SUPERSEDED, reason or f"superseded by job {new_id}", at=at)
    event = record_event(
        session,
        EventType.JOB_SUPERSEDED,
        study_id=old.study_id,
        job_id=old_id,
        superseded_by=new_id,
        **_extra(reason=reason),
    )
    event.at = when


def record_prediction(
    session: Session,
    job: Job,
    probability: float,
    label: bool,
    threshold: float,
    *,
    slice_scores: Iterable[SliceScoreInput | tuple[Any, ...]] = (),
    level: str = "study",
    aggregation: str | None = None,
    at: datetime | None = None,
) -> Prediction:
    """Record a job's result with its per-slice scores (in slice order) and an event.

    ``probability`` and ``threshold`` must lie in [0, 1]; ``level`` is one of
    :data:`PREDICTION_LEVELS`; ``aggregation`` names the patch-to-subject step.
    """
    probability = _check_unit("probability", probability)
    threshold = _check_unit("threshold", threshold)
    if level not in PREDICTION_LEVELS:
        raise ValueError(f"expected a prediction level in {PREDICTION_LEVELS}, got {level!r}")
    when = _when(at)
    job_id = _ensure_id(session, job)
    prediction = Prediction(
        job_id=job_id,
        level=level,
        probability=probability,
        label=bool(label),
        threshold=threshold,
        aggregation=aggregation,
        created_at=when,
    )
    session.add(prediction)
    session.flush()
    n_slices = 0
    for index, item in enumerate(slice_scores):
        entry = SliceScoreInput(*item)
        score = float(entry.score)
        if not math.isfinite(score):
            raise ValueError(f"expected a finite score for slice {index}, got {entry.score!r}")
        filtered = None if entry.filtered_score is None else float(entry.filtered_score)
        session.add(
            SliceScore(
                prediction_id=prediction.id,
                sop_instance_uid=str(entry.sop_instance_uid),
                position_index=index,
                score=score,
                filtered_score=filtered,
            )
        )
        n_slices += 1
    event = record_event(
        session,
        EventType.PREDICTION_RECORDED,
        study_id=job.study_id,
        job_id=job_id,
        prediction_id=prediction.id,
        level=level,
        probability=probability,
        label=bool(label),
        threshold=threshold,
        slices=n_slices,
        model_version=job.model_version,
    )
    event.at = when
    return prediction


def record_output(
    session: Session,
    job: Job,
    kind: OutputKind,
    sop_class_uid: str,
    sop_instance_uid: str,
    series_instance_uid: str,
    path: str | None = None,
    *,
    at: datetime | None = None,
) -> Output:
    """Record a DICOM object emitted for ``job`` (SR, SC, KOS) and an OUTPUT_RECORDED event."""
    kind = OutputKind(kind)
    when = _when(at)
    job_id = _ensure_id(session, job)
    output = Output(
        job_id=job_id,
        kind=kind,
        sop_class_uid=str(sop_class_uid),
        sop_instance_uid=str(sop_instance_uid),
        series_instance_uid=str(series_instance_uid),
        path=path,
        created_at=when,
    )
    session.add(output)
    event = record_event(
        session,
        EventType.OUTPUT_RECORDED,
        study_id=job.study_id,
        job_id=job_id,
        kind=kind.value,
        sop_class_uid=str(sop_class_uid),
        sop_instance_uid=str(sop_instance_uid),
    )
    event.at = when
    return output


def get_or_create_delivery(
    session: Session, job: Job, destination: str, *, at: datetime | None = None
) -> Delivery:
    """The delivery row of ``job`` to ``destination``, created pending if there is none."""
    job_id = _ensure_id(session, job)
    delivery = session.scalars(
        select(Delivery).where(Delivery.job_id == job_id, Delivery.destination == destination)
    ).first()
    if delivery is None:
        delivery = Delivery(
            job_id=job_id,
            destination=destination,
            status=DeliveryStatus.PENDING,
            attempts=0,
            created_at=_when(at),
        )
        session.add(delivery)
        session.flush()
    return delivery


# -- delivery (sijnode.delivery) ---------------------------------------------------------


def record_delivery_outcome(
    session: Session,
    delivery: Delivery,
    outcome: str,
    status: DeliveryStatus,
    *,
    started_at: datetime | None = None,
    error: str | None = None,
    status_code: int | None = None,
    sop_instance_uids: Sequence[str] = (),
    next_attempt_at: datetime | None = None,
    count_attempt: bool = True,
    at: datetime | None = None,
) -> DeliveryAttempt:
    """Record one outcome of ``delivery`` (an attempt, a commitment report, a shadow run).

    Sets the delivery's status, error, next attempt and delivered time; appends a
    ``delivery_attempts`` row and a DELIVERY_ATTEMPT event in the same transaction.
    ``count_attempt`` is False for results that are not a new try (a commitment report).
    """
    when = _when(at)
    status = DeliveryStatus(status)
    if count_attempt:
        delivery.attempts = (delivery.attempts or 0) + 1
    delivery.status = status
    delivery.last_error = error
    delivery.last_status = status_code
    delivery.next_attempt_at = None if next_attempt_at is None else as_utc(next_attempt_at)
    if status is DeliveryStatus.DELIVERED:
        delivery.delivered_at = when
    row = DeliveryAttempt(
        delivery_id=delivery.id,
        attempt=delivery.attempts,
        started_at=when if started_at is None else as_utc(started_at),
        finished_at=when,
        outcome=outcome,
        status=status_code,
        error=error,
        sop_instance_uids=list(sop_instance_uids),
    )
    session.add(row)
    job = delivery.job
    event = record_event(
        session,
        EventType.DELIVERY_ATTEMPT,
        study_id=job.study_id,
        job_id=job.id,
        delivery_id=delivery.id,
        destination=delivery.destination,
        kind=delivery.kind,
        attempt=delivery.attempts,
        success=status in (DeliveryStatus.DELIVERED, DeliveryStatus.COMMITTING),
        status=status.value,
        outcome=outcome,
        **_extra(
            error=error,
            status_code=status_code,
            sop_instance_uids=list(sop_instance_uids),
            next_attempt_at=None
            if next_attempt_at is None
            else as_utc(next_attempt_at).isoformat(),
        ),
    )
    event.at = when
    return row
