"""A filled audit database for the db tests, written through the schema and the records API.

Other test modules import the fixtures by their function names (``audit_fixture``,
``scenario_fixture``); pytest knows them as ``audit`` and ``scenario``.

``fill_scenario`` writes six studies whose every time is known, so queries, timelines
and latency percentiles can be checked exactly; ``fill_validation`` writes many studies
with random scores and truth for the metrics tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import make_engine, make_sessionmaker, record_event, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.records import (
    get_or_create_delivery,
    mark_dispatched,
    record_delivery_outcome,
    record_output,
    record_prediction,
    supersede_job,
)
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    DeliveryStatus,
    EventType,
    GroundTruth,
    Instance,
    Job,
    JobState,
    OutputKind,
    Series,
    Study,
    StudyState,
)

SECRET = "test-site-secret"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR; a literal only in test data


def at(seconds: float, day: int = 0) -> datetime:
    """T0 plus ``day`` days and ``seconds`` seconds."""
    return T0 + timedelta(days=day, seconds=seconds)


@dataclass
class Audit:
    """An open, migrated audit database."""

    url: str
    engine: Engine
    factory: sessionmaker[Session]
    uids: dict[str, str] = field(default_factory=dict)

    def session(self) -> AbstractContextManager[Session]:
        """A transaction (commits on exit)."""
        return transaction(self.factory)


def open_audit(url: str) -> Audit:
    """Migrate ``url`` to head and open it."""
    upgrade(url)
    engine = make_engine(url)
    return Audit(url=url, engine=engine, factory=make_sessionmaker(engine))


def add_study(
    session: Session,
    uid: str,
    *,
    received: datetime,
    last_after: float = 20.0,
    complete_after: float | None = 50.0,
    site: str = "north",
    sender: str = "CT_A",
    modality: str = "CT",
    manufacturer: str = "ACME",
    model_name: str = "Scan 1",
    accession: str | None = None,
    patient_id: str | None = None,
    n_instances: int = 3,
    state: StudyState | None = None,
) -> Study:
    """A study with one series of ``n_instances`` instances and its completion event."""
    completed = None if complete_after is None else received + timedelta(seconds=complete_after)
    study = Study(
        study_instance_uid=uid,
        patient_pseudonym=patient_pseudonym(patient_id, SECRET),
        accession_pseudonym=accession_pseudonym(accession, SECRET),
        study_date=received.strftime("%Y%m%d"),
        site=site,
        state=state or (StudyState.COMPLETE if completed else StudyState.RECEIVING),
        first_received_at=received,
        last_received_at=received + timedelta(seconds=last_after),
        completed_at=completed,
        completion_reason="content" if completed else None,
        calling_ae_title=sender,
    )
    session.add(study)
    session.flush()
    series = Series(
        study_id=study.id,
        series_instance_uid=f"{uid}.1",
        modality=modality,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        series_number=1,
        expected_instances=n_instances,
        first_received_at=received,
        last_received_at=received + timedelta(seconds=last_after),
    )
    session.add(series)
    session.flush()
    for i in range(n_instances):
        session.add(
            Instance(
                series_id=series.id,
                study_id=study.id,
                sop_instance_uid=f"{uid}.1.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=1000,
                sha256=f"{i:064x}",
                spool_path=f"{study.id}/{series.id}/{i}.dcm",
                instance_number=i + 1,
                received_at=received + timedelta(seconds=i),
            )
        )
    if completed is not None:
        ev = record_event(session, EventType.STUDY_COMPLETE, study_id=study.id, reason="content")
        ev.at = completed
    return study


def add_job(
    session: Session,
    study: Study,
    key: str,
    *,
    created: datetime,
    pipeline: str = "ct",
    route: str = "ct-pelvis",
    model_version: str = "v1",
    shadow: bool = False,
    generation: int = 1,
) -> Job:
    """A queued job created at ``created``, with its JOB_CREATED event."""
    job = Job(
        study_id=study.id,
        job_key=key,
        route=route,
        pipeline=pipeline,
        model_version=model_version,
        weights_sha256="ab" * 32,
        series_uids=[f"{study.study_instance_uid}.1"],
        spool_paths=[],
        shadow=shadow,
        study_generation=generation,
        created_at=created,
        updated_at=created,
    )
    session.add(job)
    session.flush()
    transition(session, job, JobState.QUEUED, "created", at=created)
    record_event(session, EventType.JOB_CREATED, study_id=study.id, job_id=job.id).at = created
    return job


def infer(
    session: Session,
    job: Job,
    start: datetime,
    probability: float,
    *,
    threshold: float = 0.5,
    level: str = "study",
) -> None:
    """Dispatch at start+1 s, run at +2 s, infer at +10 s with three slice scores."""
    mark_dispatched(session, job, at=start + timedelta(seconds=1))
    transition(session, job, JobState.RUNNING, at=start + timedelta(seconds=2))
    uid = job.series_uids[0]
    record_prediction(
        session,
        job,
        probability,
        probability >= threshold,
        threshold,
        slice_scores=[(f"{uid}.{i + 1}", probability * (i + 1) / 3) for i in range(3)],
        level=level,
        aggregation="max",
        at=start + timedelta(seconds=10),
    )
    transition(session, job, JobState.INFERRED, at=start + timedelta(seconds=10))


def report(session: Session, job: Job, when: datetime) -> None:
    """An SR output and the REPORTED state at ``when``."""
    record_output(
        session,
        job,
        OutputKind.SR,
        SR_CLASS,
        f"2.25.9{job.id}{int(when.timestamp())}",
        f"2.25.8{job.id}",
        None,
        at=when,
    )
    transition(session, job, JobState.REPORTED, at=when)


def deliver(
    session: Session,
    job: Job,
    destination: str,
    status: DeliveryStatus,
    *,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
    at: datetime | None = None,
) -> None:
    """One delivery attempt, recorded as the delivery scheduler records it."""
    delivery = get_or_create_delivery(session, job, destination, at=at)
    outcome = {DeliveryStatus.DELIVERED: "delivered", DeliveryStatus.DEAD: "permanent"}
    record_delivery_outcome(
        session,
        delivery,
        outcome.get(status, "transient"),
        status,
        error=error,
        next_attempt_at=next_attempt_at,
        at=at,
    )


def fill_scenario(audit: Audit) -> dict[str, str]:
    """Six studies with known times (see the module docstring of each test)."""
    uids = {
        "delivered": "2.25.1001",
        "failed": "2.25.1002",
        "superseded": "2.25.1003",
        "shadow": "2.25.1004",
        "receiving": "2.25.1005",
        "ignored": "2.25.1006",
    }
    with audit.session() as s:
        s.add_all(
            [
                Association(
                    calling_ae_title="CT_A",
                    called_ae_title="SIJNODE",
                    peer_address="10.0.0.1",
                    started_at=at(0),
                    ended_at=at(20),
                    outcome=AssociationOutcome.RELEASED,
                    instances_received=3,
                ),
                Association(
                    calling_ae_title="MR_B",
                    called_ae_title="SIJNODE",
                    peer_address="10.0.0.2",
                    started_at=at(0, day=1),
                    outcome=AssociationOutcome.RELEASED,
                ),
                Association(
                    calling_ae_title="EVIL",
                    called_ae_title="SIJNODE",
                    peer_address="10.6.6.6",
                    started_at=at(5),
                    outcome=AssociationOutcome.REJECTED,
                    reject_reason="calling AE title not allowed",
                ),
            ]
        )
        s.flush()
        record_event(s, EventType.ASSOCIATION_REJECTED, ae="EVIL").at = at(5)
        record_event(s, EventType.INSTANCE_REFUSED, reason="disk full").at = at(6)

        # 1: delivered. complete +50, dispatch +51, infer +60, report +62, delivered +65.
        st = add_study(s, uids["delivered"], received=at(0), accession="ACC1001", patient_id="P1")
        job = add_job(s, st, "k1", created=at(50))
        infer(s, job, at(50), 0.91)
        report(s, job, at(62))
        deliver(s, job, "pacs", DeliveryStatus.DELIVERED, at=at(65))
        transition(s, job, JobState.DELIVERED, at=at(65))

        # 2: failed MR job, from another sender and site.
        st = add_study(
            s,
            uids["failed"],
            received=at(0, 1),
            site="south",
            sender="MR_B",
            modality="MR",
            manufacturer="Other",
            model_name="MR 3T",
            complete_after=40.0,
        )
        job = add_job(
            s, st, "k2", created=at(40, 1), pipeline="mr", route="mr-sij", model_version="mr-v1"
        )
        mark_dispatched(s, job, at=at(41, 1))
        transition(s, job, JobState.RUNNING, at=at(42, 1))
        transition(s, job, JobState.FAILED, "cannot decode pixel data", at=at(45, 1))

        # 3: late images; job A (v1) superseded by job B (v2); B's delivery dies.
        st = add_study(
            s, uids["superseded"], received=at(0, 2), accession="ACC1003", complete_after=30.0
        )
        job_a = add_job(s, st, "k3a", created=at(30, 2))
        infer(s, job_a, at(30, 2), 0.2)
        st.generation = 2
        st.completed_at = at(200, 2)
        st.last_received_at = at(150, 2)
        record_event(s, EventType.STUDY_REOPENED, study_id=st.id).at = at(150, 2)
        record_event(s, EventType.STUDY_COMPLETE, study_id=st.id).at = at(200, 2)
        job_b = add_job(s, st, "k3b", created=at(200, 2), model_version="v2", generation=2)
        supersede_job(s, job_a, job_b, "late images", at=at(200, 2))
        infer(s, job_b, at(200, 2), 0.8)
        report(s, job_b, at(212, 2))
        deliver(
            s,
            job_b,
            "pacs",
            DeliveryStatus.RETRYING,
            error="connection refused",
            next_attempt_at=at(245, 2),
            at=at(215, 2),
        )
        deliver(s, job_b, "pacs", DeliveryStatus.DEAD, error="connection refused", at=at(245, 2))
        transition(s, job_b, JobState.FAILED, "delivery dead", at=at(245, 2))

        # 4: shadow mode at the south site; nothing sent.
        st = add_study(s, uids["shadow"], received=at(0, 3), site="south")
        job = add_job(s, st, "k4", created=at(50, 3), shadow=True)
        infer(s, job, at(50, 3), 0.4)
        transition(s, job, JobState.SHADOW, at=at(61, 3))

        # 5: still receiving; 6: ignored.
        add_study(s, uids["receiving"], received=at(0, 4), complete_after=None)
        add_study(
            s, uids["ignored"], received=at(10, 4), complete_after=None, state=StudyState.IGNORED
        )
    audit.uids = uids
    return uids


def fill_validation(
    audit: Audit, n: int, seed: int, *, sites: tuple[str, ...] = ("north", "south")
) -> dict[str, np.ndarray]:
    """``n`` studies, each with one inferred job and one reference label.

    Probabilities are rounded to 0.05 so that ties are common. Returns the arrays in
    the order the studies were received.
    """
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n).astype(bool)
    prob = np.round(np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1) * 20) / 20
    site = np.array([sites[i % len(sites)] for i in range(n)])
    version = np.array(["v1" if i % 3 else "v2" for i in range(n)])
    with audit.session() as s:
        for i in range(n):
            uid = f"2.25.{seed}{i:05d}"
            st = add_study(
                s,
                uid,
                received=at(60 * i),
                site=str(site[i]),
                manufacturer="ACME" if i % 2 else "Other",
                n_instances=1,
            )
            job = add_job(
                s, st, f"v{seed}-{i}", created=at(60 * i + 50), model_version=str(version[i])
            )
            record_prediction(
                s,
                job,
                float(prob[i]),
                bool(prob[i] >= 0.5),
                0.5,
                level="subject",
                at=at(60 * i + 55),
            )
            transition(s, job, JobState.RUNNING, at=at(60 * i + 51))
            transition(s, job, JobState.INFERRED, at=at(60 * i + 55))
            s.add(GroundTruth(study_instance_uid=uid, label=bool(truth[i]), reader_id="r1"))
    return {"truth": truth, "prob": prob, "pred": prob >= 0.5, "site": site, "version": version}


@pytest.fixture(name="audit")
def audit_fixture(db_url: str) -> Iterator[Audit]:
    """A migrated, empty audit database on SQLite and on PostgreSQL."""
    a = open_audit(db_url)
    yield a
    a.engine.dispose()


@pytest.fixture(name="scenario")
def scenario_fixture(audit: Audit) -> Audit:
    """The audit filled with :func:`fill_scenario`."""
    fill_scenario(audit)
    return audit


def test_scenario_fills_every_table(scenario: Audit) -> None:
    with scenario.session() as s:
        assert s.scalar(select(func.count(Study.id))) == 6
        assert s.scalar(select(func.count(Job.id))) == 5
        job_b = s.scalars(select(Job).where(Job.job_key == "k3b")).one()
        job_a = s.scalars(select(Job).where(Job.job_key == "k3a")).one()
        assert job_a.superseded_by_id == job_b.id
        assert job_a.state is JobState.SUPERSEDED
