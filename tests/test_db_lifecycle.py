"""The study and job lifecycles: every allowed move, some forbidden ones, on both databases."""

from __future__ import annotations

import ast
import logging
from collections import deque
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sijnode.db.lifecycle import JOB, STUDY, TERMINAL_JOB_STATES, Lifecycle, transition
from sijnode.db.schema import (
    Event,
    EventType,
    Job,
    JobState,
    JobTransition,
    Study,
    StudyState,
)
from sijnode.errors import SijnodeError, TransitionError
from tests.test_db_data import Audit, at, open_audit

_uids = count(1)


@pytest.fixture
def audit(db_url: str) -> Iterator[Audit]:
    a = open_audit(db_url)
    yield a
    a.engine.dispose()


def _path(lifecycle: Lifecycle, target: object) -> list[object]:
    """The shortest list of states from creation to ``target`` (breadth first)."""
    paths: dict[object, list[object]] = {None: []}
    queue: deque[object] = deque([None])
    while queue:
        state = queue.popleft()
        for frm, to in lifecycle.moves:
            if frm == state and to not in paths:
                paths[to] = [*paths[state], to]
                queue.append(to)
    assert target in paths, f"{target} cannot be reached from creation"
    return paths[target]


def _new_study(session: Session) -> Study:
    study = Study(study_instance_uid=f"2.25.{next(_uids)}", site="t")
    session.add(study)
    return study


def _new_job(session: Session) -> Job:
    study = _new_study(session)
    transition(session, study, StudyState.RECEIVING)
    job = Job(study_id=study.id, job_key=f"k{next(_uids)}", route="r", pipeline="ct")
    session.add(job)
    return job


def test_tables_cover_every_state_and_reach_it() -> None:
    for lifecycle in (STUDY, JOB):
        reached = {to for _, to in lifecycle.moves}
        assert reached == set(lifecycle.states), lifecycle.name
        for state in lifecycle.states:
            _path(lifecycle, state)
            # nothing is a dead end except the job's superseded state
            if state is not JobState.SUPERSEDED:
                assert lifecycle.allowed(state), f"{lifecycle.name} {state} is a dead end"
    assert JOB.allowed(JobState.SUPERSEDED) == ()
    assert TERMINAL_JOB_STATES == {
        JobState.DELIVERED,
        JobState.SHADOW,
        JobState.FAILED,
        JobState.SUPERSEDED,
    }


def test_every_allowed_job_move(audit: Audit) -> None:
    for frm, to in JOB.moves:
        with audit.session() as s:
            job = _new_job(s)
            path = _path(JOB, frm) if frm is not None else []
            for state in path:
                transition(s, job, state, f"to {state}")
            record = transition(s, job, to, "the move under test", at=at(10))
            job_id = job.id
        with audit.session() as s:
            job = s.get_one(Job, job_id)
            move = f"{frm} -> {to}"
            assert job.state is to, move
            assert record.state is to and record.detail == "the move under test", move
            states = s.scalars(
                select(JobTransition.state)
                .where(JobTransition.job_id == job_id)
                .order_by(JobTransition.id)
            ).all()
            assert states == [*path, to], move
            event = s.scalars(
                select(Event).where(Event.job_id == job_id).order_by(Event.id.desc())
            ).first()
            assert event is not None and event.type is EventType.JOB_STATE, move
            assert event.detail["state"] == to.value, move
            assert event.detail.get("previous") == (None if frm is None else frm.value), move
            assert (job.finished_at is not None) == (to in TERMINAL_JOB_STATES), move
            assert (job.error == "the move under test") == (to is JobState.FAILED), move


def test_every_allowed_study_move(audit: Audit) -> None:
    expected_event = {
        StudyState.COMPLETE: EventType.STUDY_COMPLETE,
        StudyState.DISPATCHED: EventType.STUDY_DISPATCHED,
        StudyState.IGNORED: EventType.STUDY_IGNORED,
    }
    for frm, to in STUDY.moves:
        with audit.session() as s:
            study = _new_study(s)
            for state in _path(STUDY, frm) if frm is not None else []:
                transition(s, study, state, f"to {state}")
            generation = study.generation
            transition(s, study, to, "the move under test", at=at(10), extra_key=1)
            study_id = study.id
        with audit.session() as s:
            study = s.get_one(Study, study_id)
            move = f"{frm} -> {to}"
            assert study.state is to, move
            event = s.scalars(
                select(Event).where(Event.study_id == study_id).order_by(Event.id.desc())
            ).first()
            assert event is not None, move
            if frm is None:
                assert event.type is EventType.STUDY_RECEIVING, move
                assert study.generation == 1, move
            elif to is StudyState.RECEIVING:
                assert event.type is EventType.STUDY_REOPENED, move
                assert study.generation == generation + 1, move
                assert study.completed_at is None and study.completion_reason is None, move
                assert study.ignored_reason is None, move
            else:
                assert event.type is expected_event[to], move
                assert study.generation == generation, move
            assert event.detail["state"] == to.value, move
            assert event.detail["generation"] == study.generation, move
            assert event.detail["extra_key"] == 1, move
            assert event.detail["reason"] == "the move under test", move
            if to is StudyState.COMPLETE:
                assert study.completion_reason == "the move under test", move
                assert study.completed_at is not None, move
            if to is StudyState.IGNORED:
                assert study.ignored_reason == "the move under test", move


@pytest.mark.parametrize(
    ("path", "to", "allowed"),
    [
        ([], JobState.RUNNING, "queued"),
        ([JobState.QUEUED], JobState.INFERRED, "queued, running, failed, superseded"),
        (
            [JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.REPORTED],
            JobState.RUNNING,
            "reported, delivered, shadow, failed, superseded",
        ),
        ([JobState.QUEUED, JobState.SUPERSEDED], JobState.QUEUED, "none (final)"),
        (
            [JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.SHADOW],
            JobState.DELIVERED,
            "superseded",
        ),
    ],
)
def test_forbidden_job_moves(
    sqlite_url: str, path: list[JobState], to: JobState, allowed: str
) -> None:
    audit = open_audit(sqlite_url)
    with audit.session() as s:
        job = _new_job(s)
        for state in path:
            transition(s, job, state)
        with s.no_autoflush:
            before = s.scalar(select(func.count(JobTransition.id)))
            with pytest.raises(TransitionError) as info:
                transition(s, job, to, "not allowed")
            after = s.scalar(select(func.count(JobTransition.id)))
        assert isinstance(info.value, SijnodeError)
        which = f"job {job.id} is {path[-1].value}" if path else "job is new"
        assert str(info.value) == f"{which}: expected a move to one of {allowed}, got {to.value}"
        assert job.state is (path[-1] if path else None)
        assert after == before
    audit.engine.dispose()


@pytest.mark.parametrize(
    ("path", "to"),
    [
        ([], StudyState.COMPLETE),
        ([StudyState.RECEIVING], StudyState.DISPATCHED),
        ([StudyState.RECEIVING], StudyState.RECEIVING),
        ([StudyState.RECEIVING, StudyState.COMPLETE, StudyState.DISPATCHED], StudyState.IGNORED),
        ([StudyState.RECEIVING, StudyState.COMPLETE, StudyState.IGNORED], StudyState.DISPATCHED),
    ],
)
def test_forbidden_study_moves(sqlite_url: str, path: list[StudyState], to: StudyState) -> None:
    audit = open_audit(sqlite_url)
    with audit.session() as s:
        study = _new_study(s)
        for state in path:
            transition(s, study, state)
        with s.no_autoflush:
            before = s.scalar(select(func.count(Event.id)))
            with pytest.raises(TransitionError, match=f"expected a move to one of .*, got {to}"):
                transition(s, study, to)
            assert study.state is (path[-1] if path else None)
            assert s.scalar(select(func.count(Event.id))) == before
    audit.engine.dispose()


def test_one_log_line_per_state_change(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    audit = open_audit(sqlite_url)
    caplog.set_level(logging.INFO, logger="sijnode.db.lifecycle")
    with audit.session() as s:
        job = _new_job(s)
        transition(s, job, JobState.QUEUED, "route r")
        transition(s, job, JobState.RUNNING, "attempt 1")
    lines = [r for r in caplog.records if r.name == "sijnode.db.lifecycle"]
    assert [r.getMessage() for r in lines] == ["study state", "job state", "job state"]
    last = lines[-1].fields  # type: ignore[attr-defined]
    assert last["state"] == "running" and last["previous"] == "queued"
    assert last["job_id"] == job.id and last["detail"] == "attempt 1"
    audit.engine.dispose()


def test_retry_after_failure_clears_finish_and_error(sqlite_url: str) -> None:
    audit = open_audit(sqlite_url)
    with audit.session() as s:
        job = _new_job(s)
        for state in (JobState.QUEUED, JobState.RUNNING):
            transition(s, job, state)
        transition(s, job, JobState.FAILED, "out of memory")
        assert job.finished_at is not None and job.error == "out of memory"
        transition(s, job, JobState.QUEUED, "manual retry")
        assert job.finished_at is None and job.error is None
    audit.engine.dispose()


def test_first_finish_is_kept_when_superseded(sqlite_url: str) -> None:
    audit = open_audit(sqlite_url)
    with audit.session() as s:
        job = _new_job(s)
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.REPORTED):
            transition(s, job, state)
        transition(s, job, JobState.DELIVERED, at=at(60))
        transition(s, job, JobState.SUPERSEDED, at=at(600))
        assert job.finished_at == at(60)
    audit.engine.dispose()


def _state_writes(tree: ast.AST) -> list[int]:
    """Lines that assign ``<x>.state`` or pass ``state=`` to a Study(...) or Job(...)."""
    lines = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        lines += [t.lineno for t in targets if isinstance(t, ast.Attribute) and t.attr == "state"]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"Study", "Job"}
        ):
            lines += [k.value.lineno for k in node.keywords if k.arg == "state"]
    return lines


def test_every_state_change_goes_through_the_lifecycle() -> None:
    root = Path(__file__).resolve().parents[1] / "sijnode"
    found = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "lifecycle.py" and path.parent.name == "db":
            continue
        lines = _state_writes(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(root))] = lines
    assert found == {}, "set states only with sijnode.db.lifecycle.transition"
