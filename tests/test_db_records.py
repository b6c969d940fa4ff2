"""The records API: each write and its event in one transaction, on both databases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import (
    get_or_create_delivery,
    mark_dispatched,
    record_delivery_outcome,
    record_output,
    record_prediction,
    supersede_job,
)
from sijnode.db.reid import reidentify, remember_identifiers
from sijnode.db.schema import (
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    EventType,
    Job,
    JobState,
    JobTransition,
    Output,
    OutputKind,
    Prediction,
    Reidentification,
    SliceScore,
    as_utc,
)
from sijnode.errors import AuditError
from sijnode.settings import DatabaseSettings, Settings
from tests.test_db_data import (
    SECRET,
    SR_CLASS,
    Audit,
    add_job,
    add_study,
    at,
    audit_fixture,  # noqa: F401 (fixture)
)


def _job(audit: Audit) -> int:
    with audit.session() as s:
        study = add_study(s, "2.25.7", received=at(0))
        return add_job(s, study, "key-7", created=at(50)).id


def test_a_job_transition_writes_row_transition_and_event(audit: Audit) -> None:
    job_id = _job(audit)
    with audit.session() as s:
        job = s.get_one(Job, job_id)
        transition(s, job, JobState.RUNNING, at=at(52))
        transition(s, job, JobState.FAILED, "out of memory", at=at(53))
    with audit.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state is JobState.FAILED
        assert job.error == "out of memory"
        assert job.finished_at is not None
        states = [t.state for t in s.scalars(select(JobTransition).order_by(JobTransition.id))]
        assert states == [JobState.QUEUED, JobState.RUNNING, JobState.FAILED]
        events = s.scalars(
            select(Event).where(Event.type == EventType.JOB_STATE).order_by(Event.id)
        ).all()
        assert [e.detail["state"] for e in events] == ["queued", "running", "failed"]
        assert events[-1].detail == {
            "state": "failed",
            "previous": "running",
            "detail": "out of memory",
        }
        assert all(e.job_id == job_id and e.study_id == job.study_id for e in events)
        # A manual retry after a failure clears finished_at again.
        transition(s, job, JobState.QUEUED, "manual retry")
        assert job.finished_at is None


def test_state_change_and_event_roll_back_together(audit: Audit) -> None:
    job_id = _job(audit)
    with pytest.raises(AuditError), transaction(audit.factory) as s:
        job = s.get_one(Job, job_id)
        transition(s, job, JobState.RUNNING)
        s.add(Job(study_id=job.study_id, job_key="key-7", route="r", pipeline="ct"))  # duplicate
        s.flush()
    with audit.session() as s:
        assert s.get_one(Job, job_id).state is JobState.QUEUED
        assert s.scalar(select(func.count(JobTransition.id))) == 1
        n_state = s.scalar(select(func.count(Event.id)).where(Event.type == EventType.JOB_STATE))
        assert n_state == 1


def test_prediction_with_slice_scores(audit: Audit) -> None:
    job_id = _job(audit)
    with audit.session() as s:
        job = s.get_one(Job, job_id)
        pred = record_prediction(
            s,
            job,
            0.7,
            True,
            0.5,
            slice_scores=[("2.25.7.1.1", 0.9), ("2.25.7.1.2", 0.1, 0.2)],
            level="subject",
            aggregation="top-3 mean",
        )
        pred_id = pred.id
    with audit.session() as s:
        pred = s.get_one(Prediction, pred_id)
        assert (pred.level, pred.probability, pred.label, pred.threshold) == (
            "subject",
            0.7,
            True,
            0.5,
        )
        assert [(x.position_index, x.score, x.filtered_score) for x in pred.slices] == [
            (0, 0.9, None),
            (1, 0.1, 0.2),
        ]
        event = s.scalars(select(Event).where(Event.type == EventType.PREDICTION_RECORDED)).one()
        assert event.detail["prediction_id"] == pred_id
        assert event.detail["slices"] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probability": 1.5}, "probability between 0 and 1"),
        ({"probability": float("nan")}, "probability between 0 and 1"),
        ({"threshold": -0.1}, "threshold between 0 and 1"),
        ({"level": "pixel"}, "prediction level"),
        ({"slice_scores": [("1.2", float("inf"))]}, "finite score"),
    ],
)
def test_prediction_is_validated(audit: Audit, kwargs: dict[str, object], message: str) -> None:
    job_id = _job(audit)
    args: dict[str, object] = {"probability": 0.5, "label": True, "threshold": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message), audit.session() as s:
        record_prediction(s, s.get_one(Job, job_id), **args)  # type: ignore[arg-type]
    with audit.session() as s:
        assert s.scalar(select(func.count(Prediction.id))) == 0
        assert s.scalar(select(func.count(SliceScore.id))) == 0


def test_output_and_delivery_attempts(audit: Audit) -> None:
    job_id = _job(audit)
    with audit.session() as s:
        job = s.get_one(Job, job_id)
        mark_dispatched(s, job, task_id="celery-1", at=at(51))
        record_output(s, job, OutputKind.SR, SR_CLASS, "2.25.7.9", "2.25.7.8", "out/sr.dcm")
        d = get_or_create_delivery(s, job, "pacs")
        record_delivery_outcome(
            s, d, "transient", DeliveryStatus.RETRYING, error="refused", next_attempt_at=at(90)
        )
        assert (d.status, d.attempts, d.last_error) == (DeliveryStatus.RETRYING, 1, "refused")
        assert as_utc(d.next_attempt_at) == at(90)
        record_delivery_outcome(
            s, d, "delivered", DeliveryStatus.DELIVERED, sop_instance_uids=["2.25.7.9"]
        )
        assert (d.status, d.attempts, d.last_error) == (DeliveryStatus.DELIVERED, 2, None)
        assert d.delivered_at is not None and d.next_attempt_at is None
        assert get_or_create_delivery(s, job, "pacs") is d  # one row per destination
        d2 = get_or_create_delivery(s, job, "archive")
        record_delivery_outcome(s, d2, "permanent", DeliveryStatus.DEAD, error="timeout")
        assert d2.status is DeliveryStatus.DEAD
    with audit.session() as s:
        job = s.get_one(Job, job_id)
        assert job.dispatched_at is not None
        assert s.scalars(select(Output)).one().kind is OutputKind.SR
        attempts = s.scalars(
            select(Event).where(Event.type == EventType.DELIVERY_ATTEMPT).order_by(Event.id)
        ).all()
        assert [(e.detail["destination"], e.detail["status"]) for e in attempts] == [
            ("pacs", "retrying"),
            ("pacs", "delivered"),
            ("archive", "dead"),
        ]
        assert attempts[1].detail["sop_instance_uids"] == ["2.25.7.9"]
        rows = s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        assert [(r.attempt, r.outcome) for r in rows] == [
            (1, "transient"),
            (2, "delivered"),
            (1, "permanent"),
        ]
        dispatched = s.scalars(select(Event).where(Event.type == EventType.JOB_DISPATCHED)).one()
        assert dispatched.detail == {"task_id": "celery-1"}


def test_supersede(audit: Audit) -> None:
    with audit.session() as s:
        study = add_study(s, "2.25.8", received=at(0))
        old = add_job(s, study, "old", created=at(50))
        new = add_job(s, study, "new", created=at(50) + timedelta(minutes=5), generation=2)
        supersede_job(s, old, new, "late images")
        assert old.superseded_by_id == new.id
        assert old.state is JobState.SUPERSEDED
        with pytest.raises(ValueError, match="supersede itself"):
            supersede_job(s, new, new)


def test_reidentification_only_when_allowed(audit: Audit) -> None:
    off = Settings(database=DatabaseSettings(url=audit.url, pseudonym_secret=SECRET))
    on = Settings(
        database=DatabaseSettings(
            url=audit.url, pseudonym_secret=SECRET, allow_reidentification=True
        )
    )
    assert off.database.allow_reidentification is False  # the default
    with audit.session() as s:
        assert remember_identifiers(s, off, "PID-1", "ACC-1") == 0
        assert s.scalar(select(func.count()).select_from(Reidentification)) == 0
        assert remember_identifiers(s, on, "PID-1", "ACC-1") == 2
        assert remember_identifiers(s, on.database, "PID-1", None) == 0  # already there
    with audit.session() as s:
        rows = {r.kind: r.identifier for r in s.scalars(select(Reidentification))}
        assert rows == {"patient": "PID-1", "accession": "ACC-1"}
        pseud = s.scalars(
            select(Reidentification.pseudonym).where(Reidentification.kind == "patient")
        ).one()
        assert reidentify(s, pseud) == ("patient", "PID-1")
        assert reidentify(s, "0" * 64) is None
