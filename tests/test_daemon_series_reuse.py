"""Two studies that share a SeriesInstanceUID never mix (issue 9, part 1).

PACS merges and splits, and anonymisers that change only the StudyInstanceUID, send a
second study (another patient, new SOP Instance UIDs) that reuses a series UID. It must
be assembled, completed and dispatched on its own, and when the first study is reopened
by a late instance its new job reads only its own instances.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select, update

from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.instances import check_job_inputs
from sijnode.db.lifecycle import transition
from sijnode.db.schema import (
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    JobTransition,
    Series,
    Study,
    StudyState,
    utcnow,
)
from sijnode.errors import MixedInputsError
from sijnode.settings import load_settings
from sijnode.uids import DEFAULT_UID_ROOT, make_uid
from sijnode.workers.context import make_worker_context
from sijnode.workers.jobs import execute_job
from tests.nodes import count, node_settings, running_node, send, wait_for
from tests.studies import make_series

STUDY_A = "1.2.826.0.1.3680043.8.498.9101"
STUDY_B = "1.2.826.0.1.3680043.8.498.9102"


def _reusing(series: list[Dataset], study_uid: str, patient_id: str) -> list[Dataset]:
    """Another patient's study that keeps ``series``' SeriesInstanceUID, all else new."""
    other = make_series("reuse-b", study_uid, 1, len(series))
    for ds, original in zip(other, series, strict=True):
        ds.SeriesInstanceUID = original.SeriesInstanceUID
        ds.SOPInstanceUID = make_uid(DEFAULT_UID_ROOT, ["reuse-b", str(ds.InstanceNumber)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = patient_id
        ds.AccessionNumber = "ACC-OTHER"
    return other


def _study(node: Node, uid: str) -> Study:
    with node.sessions() as s:
        return s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()


def _jobs_of(node: Node, uid: str) -> list[Job]:
    with node.sessions() as s:
        return list(
            s.scalars(
                select(Job)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == uid)
                .order_by(Job.id)
            )
        )


def _studies_of_paths(node: Node, paths: list[str]) -> set[str]:
    with node.sessions() as s:
        return set(
            s.scalars(
                select(Study.study_instance_uid)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.spool_path.in_(paths))
            )
        )


def test_a_reused_series_uid_never_mixes_two_studies(tmp_path: Path, db_url: str) -> None:
    # A: five slices announced, four sent now; the fifth comes late and reopens A.
    series_a = make_series("reuse-a", STUDY_A, 1, 5, images_in_acquisition=4)
    series_b = _reusing(series_a[:3], STUDY_B, "PID-OTHER-PATIENT")
    series_b_uid = str(series_b[0].SeriesInstanceUID)
    assert series_b_uid == str(series_a[0].SeriesInstanceUID)
    with running_node(node_settings(tmp_path, db_url)) as node:
        assert send(series_a[:4], node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: _study(node, STUDY_A).state is StudyState.DISPATCHED)

        # B reuses the series UID: received, completed and dispatched on its own
        assert send(series_b, node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: _study(node, STUDY_B).state is StudyState.DISPATCHED)
        study_a, study_b = _study(node, STUDY_A), _study(node, STUDY_B)
        assert study_b.ignored_reason is None
        assert study_a.patient_pseudonym != study_b.patient_pseudonym
        with node.sessions() as s:
            rows = s.scalars(select(Series).where(Series.series_instance_uid == series_b_uid)).all()
            assert sorted(r.study_id for r in rows) == [study_a.id, study_b.id]
            for row in rows:
                owners = set(
                    s.scalars(select(Instance.study_id).where(Instance.series_id == row.id))
                )
                assert owners == {row.study_id}
            reused = s.scalars(select(Event).where(Event.type == EventType.SERIES_UID_REUSED))
            (event,) = reused.all()
            assert event.study_id == study_b.id
            assert event.detail["other_studies"] == [study_a.id]
        (job_b,) = _jobs_of(node, STUDY_B)
        assert len(job_b.spool_paths) == 3
        assert _studies_of_paths(node, job_b.spool_paths) == {STUDY_B}

        # a late instance reopens A: its new job holds A's five instances and no others
        assert send(series_a[4:], node.scp.port) == [SUCCESS]
        wait_for(lambda: len(_jobs_of(node, STUDY_A)) == 2)
        wait_for(lambda: _study(node, STUDY_A).state is StudyState.DISPATCHED)
        old, new = _jobs_of(node, STUDY_A)
        assert old.state is JobState.SUPERSEDED and old.superseded_by_id == new.id
        assert new.study_generation == 2
        assert len(new.spool_paths) == 5
        assert _studies_of_paths(node, new.spool_paths) == {STUDY_A}
        assert all(p.startswith(f"{STUDY_A}/") for p in new.spool_paths)
        # every job passed both checks (dispatch and worker): none failed
        wait_for(
            lambda: all(
                j.state is JobState.NO_MODEL
                for j in _jobs_of(node, STUDY_B) + _jobs_of(node, STUDY_A)[1:]
            )
        )
        assert count(node, Job, Job.state == JobState.FAILED) == 0
        # B was left alone by A's reopening
        assert _study(node, STUDY_B).generation == 1
        assert [j.id for j in _jobs_of(node, STUDY_B)] == [job_b.id]


def _hang_on(node: Node, study_uid: str, series_of: str) -> None:
    """Recreate the defect's rows: study ``study_uid``'s instances on another study's
    series (as a database written before revision 0002 could hold)."""
    with transaction(node.sessions) as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        victim = s.scalars(
            select(Series.id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == series_of)
        ).one()
        s.execute(update(Instance).where(Instance.study_id == study.id).values(series_id=victim))


def test_dispatch_refuses_a_job_of_two_studies(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, completion={"check_interval_seconds": 3600})
    series_a = make_series("refuse-a", STUDY_A, 1, 3)
    series_b = _reusing(series_a, STUDY_B, "PID-OTHER-PATIENT")
    with running_node(settings) as node:
        assert send(series_a, node.scp.port) == [SUCCESS] * 3
        assert send(series_b, node.scp.port) == [SUCCESS] * 3
        _hang_on(node, STUDY_B, series_of=STUDY_A)
        done = node.check_studies(now=utcnow() + timedelta(seconds=10))
        assert len(done) == 2
        (job_a,) = _jobs_of(node, STUDY_A)
        assert job_a.state is JobState.FAILED
        assert f"expected every input from study {job_a.study_id}" in (job_a.error or "")
        assert job_a.dispatched_at is None  # never sent
        with node.sessions() as s:
            states = s.scalars(
                select(JobTransition.state)
                .where(JobTransition.job_id == job_a.id)
                .order_by(JobTransition.id)
            ).all()
        assert states == [JobState.QUEUED, JobState.FAILED]


def test_worker_refuses_inputs_of_two_studies(sqlite_url: str, tmp_path: Path) -> None:
    """The worker checks again before any pipeline runs: a job row whose inputs were
    changed after dispatch (or written by an older node) fails with the reason."""
    settings = node_settings(tmp_path, sqlite_url)
    series_a = make_series("worker-a", STUDY_A, 1, 2)
    series_b = _reusing(series_a, STUDY_B, "PID-OTHER-PATIENT")
    with running_node(settings) as node:
        assert send(series_a + series_b, node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: len(_jobs_of(node, STUDY_A)) == len(_jobs_of(node, STUDY_B)) == 1)
        wait_for(lambda: all(j.state is JobState.NO_MODEL for j in _jobs_of(node, STUDY_A)))
    (job_a,), (job_b,) = _jobs_of(node, STUDY_A), _jobs_of(node, STUDY_B)
    sessions = make_sessionmaker(make_engine(sqlite_url))
    with transaction(sessions) as s:
        job = s.get_one(Job, job_a.id)
        job.spool_paths = [*job_a.spool_paths, job_b.spool_paths[0]]
        try:
            check_job_inputs(s, job)
        except MixedInputsError as exc:
            assert "expected every input from study" in str(exc)
        else:
            raise AssertionError("a job with another study's instance passed the check")
        transition(s, job, JobState.QUEUED, "sent again")
    ctx = make_worker_context(load_settings(overrides={"database": {"url": sqlite_url}}))
    assert execute_job(ctx, job_a.id) is JobState.FAILED
    with transaction(sessions) as s:
        job = s.get_one(Job, job_a.id)
        assert job.state is JobState.FAILED
        assert job.error is not None and "expected every input from study" in job.error
        last = s.scalars(
            select(JobTransition)
            .where(JobTransition.job_id == job.id)
            .order_by(JobTransition.id.desc())
        ).first()
        assert last is not None and last.state is JobState.FAILED and last.detail == job.error


def test_a_sop_instance_uid_under_another_study_is_a_conflict(tmp_path: Path) -> None:
    """Not a duplicate: both copies kept, each in its own study, and flagged."""
    series_a = make_series("sop-a", STUDY_A, 1, 2)
    series_b = make_series("sop-b", STUDY_B, 1, 2)
    series_b[0].SOPInstanceUID = series_a[0].SOPInstanceUID
    series_b[0].file_meta.MediaStorageSOPInstanceUID = series_a[0].SOPInstanceUID
    uid = str(series_a[0].SOPInstanceUID)
    with running_node(node_settings(tmp_path)) as node:
        assert send(series_a, node.scp.port) == [SUCCESS] * 2
        assert send(series_b, node.scp.port) == [SUCCESS] * 2
        study_a, study_b = _study(node, STUDY_A), _study(node, STUDY_B)
        with node.sessions() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).all()
            assert sorted(r.study_id for r in rows) == [study_a.id, study_b.id]
            assert all(r.conflict for r in rows)
            (event,) = s.scalars(
                select(Event).where(Event.type == EventType.INSTANCE_CONFLICT)
            ).all()
            assert event.study_id == study_b.id
            assert event.detail["other_studies"] == [study_a.id]
            assert count(node, Event, Event.type == EventType.INSTANCE_DUPLICATE) == 0
        wait_for(lambda: len(_jobs_of(node, STUDY_A)) == len(_jobs_of(node, STUDY_B)) == 1)
        for uid_of_study in (STUDY_A, STUDY_B):
            (job,) = _jobs_of(node, uid_of_study)
            assert len(job.spool_paths) == 2
            assert _studies_of_paths(node, job.spool_paths) == {uid_of_study}
