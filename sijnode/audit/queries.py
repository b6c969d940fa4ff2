"""Read-only audit queries: study and job lists, a study's timeline, exports, a summary.

Every function takes an open session and returns plain rows (lists of dicts with
stable keys), which :mod:`sijnode.audit.render` prints as a table, JSON or CSV. Times are
aware UTC datetimes on both databases. :class:`~sijnode.audit.filters.AuditFilter` selects
the rows; :func:`job_conditions` and :func:`study_conditions` are its SQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Select, exists, func, or_, select
from sqlalchemy.orm import Session

from sijnode.audit.filters import AuditFilter
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    Delivery,
    DeliveryStatus,
    Event,
    EventType,
    GroundTruth,
    Instance,
    Job,
    JobState,
    JobTransition,
    Output,
    Prediction,
    Series,
    SliceScore,
    Study,
    StudyState,
    as_utc,
)
from sijnode.errors import AuditError

#: Prediction levels that count as the study's result (lists, exports, metrics).
RESULT_LEVELS = ("study", "subject")

#: The stages whose latency ``audit summary`` reports, as (name, from, to) milestones.
LATENCY_STAGES: tuple[tuple[str, str, str], ...] = (
    ("receive→complete", "received", "complete"),
    ("complete→dispatch", "complete", "dispatched"),
    ("dispatch→inferred", "dispatched", "inferred"),
    ("inferred→reported", "inferred", "reported"),
    ("reported→delivered", "reported", "delivered"),
    ("receive→delivered", "received", "delivered"),
)


class StudyNotFoundError(AuditError):
    """No study with the given StudyInstanceUID is in the audit."""


def job_conditions(flt: AuditFilter) -> list[Any]:
    """Conditions on :class:`Job` for pipeline, model version, route, shadow, delivery."""
    conds: list[Any] = []
    if flt.pipeline is not None:
        conds.append(Job.pipeline == flt.pipeline)
    if flt.model_version is not None:
        conds.append(Job.model_version == flt.model_version)
    if flt.route is not None:
        conds.append(Job.route == flt.route)
    if flt.shadow is not None:
        conds.append(Job.shadow.is_(flt.shadow))
    if flt.delivery is not None:
        conds.append(exists().where(Delivery.job_id == Job.id, Delivery.status == flt.delivery))
    return conds


def study_conditions(flt: AuditFilter) -> list[Any]:
    """Conditions on :class:`Study` for sender and site."""
    conds: list[Any] = []
    if flt.sender is not None:
        conds.append(Study.calling_ae_title == flt.sender)
    if flt.site is not None:
        conds.append(Study.site == flt.site)
    return conds


def _window(column: Any, flt: AuditFilter) -> list[Any]:
    conds: list[Any] = []
    if flt.since is not None:
        conds.append(column >= as_utc(flt.since))
    if flt.until is not None:
        conds.append(column < as_utc(flt.until))
    return conds


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


def _seconds(start: datetime | None, stop: datetime | None) -> float | None:
    if start is None or stop is None:
        return None
    return (as_utc(stop) - as_utc(start)).total_seconds()


# --------------------------------------------------------------------------- selections


def studies_select(flt: AuditFilter) -> Select[Study]:
    """Studies matching ``flt``: received in the window, with a matching job if asked."""
    stmt = select(Study).where(*_window(Study.first_received_at, flt), *study_conditions(flt))
    if flt.state is not None:
        stmt = stmt.where(Study.state == StudyState(flt.state))
    job_conds = job_conditions(flt)
    if job_conds:
        stmt = stmt.where(exists().where(Job.study_id == Study.id, *job_conds))
    return stmt


def jobs_select(flt: AuditFilter) -> Select[Job, Study]:
    """Jobs matching ``flt`` (created in the window) with their study."""
    stmt = (
        select(Job, Study)
        .join(Study, Job.study_id == Study.id)
        .where(*_window(Job.created_at, flt), *study_conditions(flt), *job_conditions(flt))
    )
    if flt.state is not None:
        stmt = stmt.where(Job.state == JobState(flt.state))
    return stmt


def latest_predictions(session: Session, job_ids: Iterable[int]) -> dict[int, Prediction]:
    """Each job's result: its latest study/subject-level prediction, else its latest one."""
    ids = sorted(set(job_ids))
    best: dict[int, Prediction] = {}
    for chunk in _chunks(ids):
        rows = session.scalars(
            select(Prediction)
            .where(Prediction.job_id.in_(chunk))
            .order_by(Prediction.created_at, Prediction.id)
        )
        for pred in rows:
            current = best.get(pred.job_id)
            if current is None or (
                (pred.level in RESULT_LEVELS) >= (current.level in RESULT_LEVELS)
            ):
                best[pred.job_id] = pred
    return best


def _chunks(ids: Sequence[int], size: int = 5000) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _deliveries(session: Session, job_ids: Iterable[int]) -> dict[int, list[Delivery]]:
    out: dict[int, list[Delivery]] = defaultdict(list)
    ids = sorted(set(job_ids))
    for chunk in _chunks(ids):
        for d in session.scalars(
            select(Delivery).where(Delivery.job_id.in_(chunk)).order_by(Delivery.id)
        ):
            out[d.job_id].append(d)
    return out


def _delivery_text(deliveries: Sequence[Delivery]) -> str | None:
    if not deliveries:
        return None
    return ",".join(f"{d.destination}:{DeliveryStatus(d.status).value}" for d in deliveries)


def _is_active(job: Job) -> bool:
    return job.superseded_by_id is None and job.state is not JobState.SUPERSEDED


# --------------------------------------------------------------------------- listings

STUDY_COLUMNS = (
    "study_instance_uid",
    "site",
    "sender",
    "state",
    "first_received_at",
    "completed_at",
    "series",
    "instances",
    "jobs",
    "job_state",
    "probability",
    "label",
    "delivery",
)


def list_studies(
    session: Session, flt: AuditFilter | None = None, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """Studies newest first, with counts and the result of their latest active job."""
    flt = flt or AuditFilter()
    base = studies_select(flt).order_by(Study.first_received_at.desc(), Study.id.desc())
    if limit:
        base = base.limit(limit)
    studies = list(session.scalars(base))
    if not studies:
        return []
    ids = [s.id for s in studies]
    series_n: dict[int, int] = {}
    instances_n: dict[int, int] = {}
    jobs_by_study: dict[int, list[Job]] = defaultdict(list)
    for chunk in _chunks(ids):
        series_n.update(
            session.execute(
                select(Series.study_id, func.count(Series.id))
                .where(Series.study_id.in_(chunk))
                .group_by(Series.study_id)
            ).all()
        )
        instances_n.update(
            session.execute(
                select(Instance.study_id, func.count(Instance.id))
                .where(Instance.study_id.in_(chunk))
                .group_by(Instance.study_id)
            ).all()
        )
        for job in session.scalars(
            select(Job).where(Job.study_id.in_(chunk)).order_by(Job.created_at, Job.id)
        ):
            jobs_by_study[job.study_id].append(job)
    all_jobs = [j.id for js in jobs_by_study.values() for j in js]
    predictions = latest_predictions(session, all_jobs)
    deliveries = _deliveries(session, all_jobs)
    rows: list[dict[str, Any]] = []
    for study in studies:
        jobs = jobs_by_study.get(study.id, [])
        active = [j for j in jobs if _is_active(j)]
        latest = (active or jobs)[-1] if jobs else None
        pred = predictions.get(latest.id) if latest is not None else None
        rows.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "site": study.site,
                "sender": study.calling_ae_title,
                "state": StudyState(study.state).value,
                "generation": study.generation,
                "study_date": study.study_date,
                "first_received_at": _utc(study.first_received_at),
                "last_received_at": _utc(study.last_received_at),
                "completed_at": _utc(study.completed_at),
                "completion_reason": study.completion_reason,
                "series": series_n.get(study.id, 0),
                "instances": instances_n.get(study.id, 0),
                "jobs": len(jobs),
                "job_id": None if latest is None else latest.id,
                "job_state": None if latest is None else JobState(latest.state).value,
                "pipeline": None if latest is None else latest.pipeline,
                "model_version": None if latest is None else latest.model_version,
                "probability": None if pred is None else pred.probability,
                "label": None if pred is None else pred.label,
                "delivery": None if latest is None else _delivery_text(deliveries[latest.id]),
                "patient_pseudonym": study.patient_pseudonym,
                "accession_pseudonym": study.accession_pseudonym,
            }
        )
    return rows


JOB_COLUMNS = (
    "job_id",
    "study_instance_uid",
    "route",
    "pipeline",
    "model_version",
    "state",
    "shadow",
    "created_at",
    "dispatched_at",
    "finished_at",
    "probability",
    "label",
    "delivery",
    "error",
)


def list_jobs(
    session: Session, flt: AuditFilter | None = None, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """Jobs newest first, with their result and delivery state."""
    flt = flt or AuditFilter()
    stmt = jobs_select(flt).order_by(Job.created_at.desc(), Job.id.desc())
    if limit:
        stmt = stmt.limit(limit)
    pairs = list(session.execute(stmt).all())
    job_ids = [job.id for job, _ in pairs]
    predictions = latest_predictions(session, job_ids)
    deliveries = _deliveries(session, job_ids)
    rows: list[dict[str, Any]] = []
    for job, study in pairs:
        pred = predictions.get(job.id)
        rows.append(
            {
                "job_id": job.id,
                "study_instance_uid": study.study_instance_uid,
                "site": study.site,
                "sender": study.calling_ae_title,
                "route": job.route,
                "pipeline": job.pipeline,
                "model_version": job.model_version,
                "weights_sha256": job.weights_sha256,
                "state": JobState(job.state).value,
                "shadow": job.shadow,
                "study_generation": job.study_generation,
                "superseded_by": job.superseded_by_id,
                "attempts": job.attempts,
                "worker_host": job.worker_host,
                "device": job.device,
                "created_at": _utc(job.created_at),
                "dispatched_at": _utc(job.dispatched_at),
                "finished_at": _utc(job.finished_at),
                "probability": None if pred is None else pred.probability,
                "label": None if pred is None else pred.label,
                "threshold": None if pred is None else pred.threshold,
                "delivery": _delivery_text(deliveries.get(job.id, [])),
                "series_uids": list(job.series_uids or []),
                "stage_timings": dict(job.stage_timings or {}),
                "error": job.error,
            }
        )
    return rows


def truth_consensus(
    session: Session, study_uids: Iterable[str] | None = None, reader: str | None = None
) -> tuple[dict[str, bool], set[str]]:
    """Reference label per study: one reader's, or the majority of all readers.

    Returns the labels and the set of studies whose readers are tied (left out).
    """
    stmt = select(GroundTruth.study_instance_uid, GroundTruth.label, GroundTruth.reader_id)
    if reader is not None:
        stmt = stmt.where(GroundTruth.reader_id == reader)
    wanted = None if study_uids is None else set(study_uids)
    votes: dict[str, list[bool]] = defaultdict(list)
    for uid, label, _reader in session.execute(stmt):
        if wanted is None or uid in wanted:
            votes[uid].append(bool(label))
    labels: dict[str, bool] = {}
    tied: set[str] = set()
    for uid, vs in votes.items():
        positives = sum(vs)
        if positives * 2 == len(vs):
            tied.add(uid)
        else:
            labels[uid] = positives * 2 > len(vs)
    return labels, tied


def list_predictions(
    session: Session, flt: AuditFilter | None = None, *, limit: int | None = None
) -> list[dict[str, Any]]:
    """Every prediction of the matching jobs, with provenance, slice scores and truth."""
    flt = flt or AuditFilter()
    jobs = jobs_select(flt).subquery()
    stmt = (
        select(Prediction, Job, Study)
        .join(Job, Prediction.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(Job.id.in_(select(jobs.c.id)))
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
    )
    if limit:
        stmt = stmt.limit(limit)
    triples = list(session.execute(stmt).all())
    slices: dict[int, list[dict[str, Any]]] = defaultdict(list)
    pred_ids = sorted({p.id for p, _, _ in triples})
    for chunk in _chunks(pred_ids):
        for s in session.scalars(
            select(SliceScore)
            .where(SliceScore.prediction_id.in_(chunk))
            .order_by(SliceScore.prediction_id, SliceScore.position_index)
        ):
            slices[s.prediction_id].append(
                {
                    "sop_instance_uid": s.sop_instance_uid,
                    "index": s.position_index,
                    "score": s.score,
                    "filtered_score": s.filtered_score,
                }
            )
    truth, _tied = truth_consensus(session, {st.study_instance_uid for _, _, st in triples})
    return [
        {
            "prediction_id": pred.id,
            "job_id": job.id,
            "study_instance_uid": study.study_instance_uid,
            "site": study.site,
            "route": job.route,
            "pipeline": job.pipeline,
            "model_version": job.model_version,
            "weights_sha256": job.weights_sha256,
            "shadow": job.shadow,
            "active": _is_active(job),
            "level": pred.level,
            "probability": pred.probability,
            "label": pred.label,
            "threshold": pred.threshold,
            "aggregation": pred.aggregation,
            "created_at": _utc(pred.created_at),
            "n_slices": len(slices.get(pred.id, [])),
            "truth": truth.get(study.study_instance_uid),
            "slice_scores": slices.get(pred.id, []),
        }
        for pred, job, study in triples
    ]


# --------------------------------------------------------------------------- timeline


def study_timeline(session: Session, study_uid: str) -> list[dict[str, Any]]:
    """Everything that happened to one study, oldest first.

    The milestones ``received``, ``complete``, ``dispatched``, ``inferred``, ``reported``
    and ``delivered`` come from the study, job, transition and delivery rows and the
    events; every other event of the study and its jobs is listed as ``event:<type>``.
    """
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None:
        raise StudyNotFoundError(f"no study with StudyInstanceUID {study_uid!r} in the audit")
    entries: list[dict[str, Any]] = []

    def add(at: datetime | None, stage: str, job_id: int | None, detail: str) -> None:
        if at is not None:
            entries.append({"at": as_utc(at), "stage": stage, "job_id": job_id, "detail": detail})

    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))
    job_ids = [j.id for j in jobs]
    event_cond = Event.study_id == study.id
    if job_ids:
        event_cond = or_(event_cond, Event.job_id.in_(job_ids))
    events = list(session.scalars(select(Event).where(event_cond).order_by(Event.id)))
    by_type: dict[EventType, list[Event]] = defaultdict(list)
    for ev in events:
        by_type[EventType(ev.type)].append(ev)

    add(study.first_received_at, "received", None, "first instance")
    add(study.last_received_at, "last_received", None, "last instance so far")
    completions = by_type.get(EventType.STUDY_COMPLETE, [])
    for ev in completions:
        add(ev.at, "complete", None, _detail(ev.detail))
    if not completions:
        add(study.completed_at, "complete", None, study.completion_reason or "")
    for ev in by_type.get(EventType.STUDY_REOPENED, []):
        add(ev.at, "reopened", None, _detail(ev.detail))
    dispatches: dict[int | None, list[Event]] = defaultdict(list)
    for ev in by_type.get(EventType.JOB_DISPATCHED, []):
        dispatches[ev.job_id].append(ev)
    for job in jobs:
        add(
            job.created_at,
            "job_created",
            job.id,
            f"{job.route}/{job.pipeline} model {job.model_version or '-'}"
            + (" shadow" if job.shadow else "")
            + f", generation {job.study_generation}",
        )
        for ev in dispatches.get(job.id, []):
            add(ev.at, "dispatched", job.id, _detail(ev.detail))
        if not dispatches.get(job.id):
            add(job.dispatched_at, "dispatched", job.id, "")
    attempted: set[int] = set()
    for ev in by_type.get(EventType.DELIVERY_ATTEMPT, []):
        info = ev.detail or {}
        attempted.add(int(info.get("delivery_id", -1)))
        outcome = info.get("status", "ok" if info.get("success") else "failed")
        error = f" ({info['error']})" if info.get("error") else ""
        where = f"{info.get('destination', '?')} attempt {info.get('attempt', '?')}"
        add(ev.at, "delivery_attempt", ev.job_id, f"{where}: {outcome}{error}")
    if job_ids:
        for tr in session.scalars(
            select(JobTransition)
            .where(JobTransition.job_id.in_(job_ids))
            .order_by(JobTransition.id)
        ):
            add(tr.at, JobState(tr.state).value, tr.job_id, tr.detail or "")
        for pred in session.scalars(select(Prediction).where(Prediction.job_id.in_(job_ids))):
            add(
                pred.created_at,
                "prediction",
                pred.job_id,
                f"{pred.level} p={pred.probability:.4f} label={int(pred.label)} "
                f"threshold={pred.threshold:.4f}",
            )
        for out in session.scalars(select(Output).where(Output.job_id.in_(job_ids))):
            add(out.created_at, "output", out.job_id, f"{out.kind.value} {out.sop_instance_uid}")
        for d in session.scalars(select(Delivery).where(Delivery.job_id.in_(job_ids))):
            if d.id not in attempted:
                add(d.delivered_at, "delivery_attempt", d.job_id, f"{d.destination}: delivered")
    shown = {
        EventType.STUDY_COMPLETE,
        EventType.STUDY_REOPENED,
        EventType.JOB_CREATED,
        EventType.JOB_DISPATCHED,
        EventType.JOB_STATE,
        EventType.PREDICTION_RECORDED,
        EventType.OUTPUT_RECORDED,
        EventType.DELIVERY_ATTEMPT,
    }
    for ev in events:
        if EventType(ev.type) not in shown:
            add(ev.at, f"event:{EventType(ev.type).value}", ev.job_id, _detail(ev.detail))
    entries.sort(key=lambda e: e["at"])
    start = as_utc(study.first_received_at)
    for e in entries:
        e["elapsed_s"] = round((e["at"] - start).total_seconds(), 3)
    return entries


def _detail(detail: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (detail or {}).items())


TIMELINE_COLUMNS = ("at", "elapsed_s", "stage", "job_id", "detail")


# --------------------------------------------------------------------------- summary


def job_milestones(session: Session, flt: AuditFilter) -> list[dict[str, datetime | None]]:
    """Per matching job: when its study was received and completed, and when the job was
    dispatched, inferred, reported and delivered (first time each; None if never)."""
    pairs = list(session.execute(jobs_select(flt)).all())
    job_ids = [j.id for j, _ in pairs]
    first: dict[tuple[int, JobState], datetime] = {}
    delivered_at: dict[int, list[datetime | None]] = defaultdict(list)
    for chunk in _chunks(sorted(job_ids)):
        for job_id, state, at in session.execute(
            select(JobTransition.job_id, JobTransition.state, func.min(JobTransition.at))
            .where(JobTransition.job_id.in_(chunk))
            .group_by(JobTransition.job_id, JobTransition.state)
        ):
            first[(job_id, JobState(state))] = as_utc(at)
        for job_id, status, when in session.execute(
            select(Delivery.job_id, Delivery.status, Delivery.delivered_at).where(
                Delivery.job_id.in_(chunk)
            )
        ):
            delivered_at[job_id].append(
                when if DeliveryStatus(status) is DeliveryStatus.DELIVERED else None
            )
    out: list[dict[str, datetime | None]] = []
    for job, study in pairs:
        complete = (
            study.completed_at
            if study.completed_at is not None and job.study_generation == study.generation
            else job.created_at
        )
        delivered = first.get((job.id, JobState.DELIVERED))
        times = delivered_at.get(job.id)
        if delivered is None and times and all(t is not None for t in times):
            delivered = max(as_utc(t) for t in times if t is not None)
        out.append(
            {
                "received": _utc(study.first_received_at),
                "complete": _utc(complete),
                "dispatched": _utc(job.dispatched_at),
                "inferred": first.get((job.id, JobState.INFERRED)),
                "reported": first.get((job.id, JobState.REPORTED)),
                "delivered": delivered,
            }
        )
    return out


def _percentiles(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50_s": None, "p95_s": None, "max_s": None}
    arr = np.asarray(values, dtype=float)
    return {
        "n": len(values),
        "p50_s": float(np.percentile(arr, 50)),
        "p95_s": float(np.percentile(arr, 95)),
        "max_s": float(arr.max()),
    }


def _count_by(session: Session, column: Any, *conds: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).where(*conds).group_by(column))
    return {str(getattr(k, "value", k)): int(n) for k, n in rows}


def summary(session: Session, flt: AuditFilter | None = None) -> dict[str, list[dict[str, Any]]]:
    """Volumes, per-stage latency percentiles (seconds) and failures in the window.

    Studies count by ``first_received_at``, jobs by ``created_at``; receive→complete is
    per study (first instance to completion), the other stages per job.
    """
    flt = flt or AuditFilter()
    studies = studies_select(flt).subquery()
    jobs = jobs_select(flt).with_only_columns(Job.id).subquery()
    in_jobs = Job.id.in_(select(jobs.c.id))
    assoc_window = _window(Association.started_at, flt)
    if flt.sender is not None:
        assoc_window.append(Association.calling_ae_title == flt.sender)
    assoc = _count_by(session, Association.outcome, *assoc_window)
    instances = session.scalar(
        select(func.count(Instance.id)).where(Instance.study_id.in_(select(studies.c.id)))
    )
    study_states = _count_by(session, Study.state, Study.id.in_(select(studies.c.id)))
    job_states = _count_by(session, Job.state, in_jobs)
    pipelines = _count_by(session, Job.pipeline, in_jobs)
    predictions = _count_by(
        session,
        Prediction.label,
        Prediction.job_id.in_(select(jobs.c.id)),
        Prediction.level.in_(RESULT_LEVELS),
    )
    deliveries = _count_by(session, Delivery.status, Delivery.job_id.in_(select(jobs.c.id)))
    outputs = _count_by(session, Output.kind, Output.job_id.in_(select(jobs.c.id)))
    volumes: list[dict[str, Any]] = [
        {"metric": "associations", "value": sum(assoc.values())},
        {"metric": "instances", "value": int(instances or 0)},
        {"metric": "studies", "value": sum(study_states.values())},
    ]
    volumes += [{"metric": f"studies.{k}", "value": v} for k, v in sorted(study_states.items())]
    volumes.append({"metric": "jobs", "value": sum(job_states.values())})
    volumes += [{"metric": f"jobs.{k}", "value": v} for k, v in sorted(job_states.items())]
    volumes += [{"metric": f"jobs.pipeline.{k}", "value": v} for k, v in sorted(pipelines.items())]
    volumes.append(
        {"metric": "predictions.positive", "value": predictions.get("True", 0)},
    )
    volumes.append({"metric": "predictions.negative", "value": predictions.get("False", 0)})
    volumes += [{"metric": f"outputs.{k}", "value": v} for k, v in sorted(outputs.items())]
    volumes += [{"metric": f"deliveries.{k}", "value": v} for k, v in sorted(deliveries.items())]

    milestones = job_milestones(session, flt)
    latency: list[dict[str, Any]] = []
    for name, start, stop in LATENCY_STAGES:
        if name == "receive→complete":
            values = [
                s
                for s in (
                    _seconds(a, b)
                    for a, b in session.execute(
                        select(Study.first_received_at, Study.completed_at).where(
                            Study.id.in_(select(studies.c.id)), Study.completed_at.is_not(None)
                        )
                    )
                )
                if s is not None
            ]
        else:
            values = [s for m in milestones if (s := _seconds(m[start], m[stop])) is not None]
        latency.append({"stage": name, **_percentiles(values)})

    event_window = _window(Event.at, flt)
    events = _count_by(
        session,
        Event.type,
        *event_window,
        Event.type.in_(
            [
                EventType.INSTANCE_REFUSED,
                EventType.INSTANCE_CONFLICT,
                EventType.INSTANCE_DUPLICATE,
                EventType.ASSOCIATION_REJECTED,
            ]
        ),
    )
    failures = [
        {"metric": "associations.rejected", "value": assoc.get(AssociationOutcome.REJECTED, 0)},
        {"metric": "associations.aborted", "value": assoc.get(AssociationOutcome.ABORTED, 0)},
        {"metric": "instances.refused", "value": events.get(EventType.INSTANCE_REFUSED, 0)},
        {"metric": "instances.conflict", "value": events.get(EventType.INSTANCE_CONFLICT, 0)},
        {"metric": "instances.duplicate", "value": events.get(EventType.INSTANCE_DUPLICATE, 0)},
        {"metric": "studies.ignored", "value": study_states.get(StudyState.IGNORED, 0)},
        {"metric": "jobs.failed", "value": job_states.get(JobState.FAILED, 0)},
        {"metric": "jobs.no_model", "value": job_states.get(JobState.NO_MODEL, 0)},
        {"metric": "deliveries.retrying", "value": deliveries.get(DeliveryStatus.RETRYING, 0)},
        {"metric": "deliveries.dead", "value": deliveries.get(DeliveryStatus.DEAD, 0)},
    ]
    return {"volumes": volumes, "latency": latency, "failures": failures}
