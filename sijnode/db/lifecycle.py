"""The lives of a study and of a job: their states, the allowed moves, one function to move.

Modelled on pynetdicom's ``fsm.py`` (the PS3.8 upper-layer state machine): the states are
enums (:class:`~sijnode.db.schema.StudyState`, :class:`~sijnode.db.schema.JobState`), the
allowed moves are a table from (state, next state) to what the move means, and
:func:`transition` is the only code in sijnode that changes ``Study.state`` or
``Job.state``. A move that is not in the table raises :class:`TransitionError` ("expected
one of …, got …") and changes nothing.

Every move, in the caller's transaction (nothing here commits):

* a **job** move updates the row, appends a ``job_transitions`` row and a ``job_state``
  event;
* a **study** move updates the row and appends one event whose type names the state
  entered (``study_receiving``, ``study_complete``, ``study_ignored``,
  ``study_dispatched``, or ``study_reopened`` for a late instance); the ``events`` table
  is the study's transition record (``study_id``, ``state``, ``previous``,
  ``generation``), so there is no second table to keep in step with it;
* both log one structured line (ids and states only, never patient identifiers).

The fields tied to a state are kept here too: ``completed_at``/``completion_reason`` on
entering complete, ``ignored_reason`` on ignored, a new ``generation`` on reopening;
``finished_at`` on a job's terminal states and ``error`` on failed.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar, overload

from sqlalchemy.orm import Session

from sijnode.db.engine import record_event
from sijnode.db.schema import (
    Event,
    EventType,
    Job,
    JobState,
    JobTransition,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from sijnode.errors import TransitionError
from sijnode.logs import fields

log = logging.getLogger(__name__)

S = TypeVar("S", bound=enum.StrEnum)


@dataclass(frozen=True)
class Lifecycle(Generic[S]):
    """The states of one kind of row and the moves allowed between them.

    ``moves`` maps (from, to) to what the move means; ``None`` as *from* is the row's
    creation. A move from a state to itself is a retry (it is recorded like any other).
    """

    name: str
    states: type[S]
    moves: Mapping[tuple[S | None, S], str]
    terminal: frozenset[S]

    def allowed(self, current: S | None) -> tuple[S, ...]:
        """The states reachable in one move from ``current``, in the enum's order."""
        return tuple(s for s in self.states if (current, s) in self.moves)

    def check(self, current: S | None, to: S, row_id: int | None = None) -> str:
        """What the move means; TransitionError if the table does not allow it."""
        meaning = self.moves.get((current, to))
        if meaning is None:
            allowed = ", ".join(s.value for s in self.allowed(current)) or "none (final)"
            where = "new" if current is None else current.value
            which = self.name if row_id is None else f"{self.name} {row_id}"
            raise TransitionError(
                f"{which} is {where}: expected a move to one of {allowed}, got {to.value}"
            )
        return meaning


STUDY = Lifecycle[StudyState](
    name="study",
    states=StudyState,
    moves={
        (None, StudyState.RECEIVING): "first instance of a new study",
        (StudyState.RECEIVING, StudyState.COMPLETE): "a completion rule holds",
        (StudyState.COMPLETE, StudyState.DISPATCHED): "routed: its jobs are created",
        (StudyState.COMPLETE, StudyState.IGNORED): "no route matched any series",
        (StudyState.COMPLETE, StudyState.RECEIVING): "late instance before dispatch: reopened",
        (StudyState.DISPATCHED, StudyState.RECEIVING): "late instance: reopened for a new job",
        (StudyState.IGNORED, StudyState.RECEIVING): "late instance: reopened, routed again",
    },
    terminal=frozenset(),  # a late instance can always reopen a study
)

_SUPERSEDED = "a newer generation of the study replaces it"

JOB = Lifecycle[JobState](
    name="job",
    states=JobState,
    moves={
        (None, JobState.QUEUED): "created by dispatch",
        (JobState.QUEUED, JobState.QUEUED): "sent again: the dispatch failed or was lost",
        (JobState.QUEUED, JobState.RUNNING): "a worker claimed it",
        (JobState.QUEUED, JobState.FAILED): "its inputs failed the check before it ran",
        (JobState.QUEUED, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.RUNNING, JobState.RUNNING): "run again: the lease of the run holding it lapsed",
        (JobState.RUNNING, JobState.INFERRED): "the pipeline recorded its prediction",
        (JobState.RUNNING, JobState.NO_MODEL): "no model configured for its pipeline: waits",
        (JobState.RUNNING, JobState.FAILED): "the pipeline raised or its inputs were refused",
        (JobState.RUNNING, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.NO_MODEL, JobState.NO_MODEL): "run again, still no model",
        (JobState.NO_MODEL, JobState.QUEUED): "a model is configured: sent again",
        (JobState.NO_MODEL, JobState.RUNNING): "a worker with the model claimed it",
        (JobState.NO_MODEL, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.INFERRED, JobState.REPORTED): "its SR and secondary captures are recorded",
        (JobState.INFERRED, JobState.SHADOW): "shadow mode: the result is kept, nothing sent",
        (JobState.INFERRED, JobState.FAILED): "its report could not be built",
        (JobState.INFERRED, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.REPORTED, JobState.REPORTED): "a delivery attempt failed: retried later",
        (JobState.REPORTED, JobState.DELIVERED): "every destination accepted the outputs",
        (JobState.REPORTED, JobState.SHADOW): "shadow mode: the report is kept, not sent",
        (JobState.REPORTED, JobState.FAILED): "delivery given up (dead)",
        (JobState.REPORTED, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.DELIVERED, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.SHADOW, JobState.SUPERSEDED): _SUPERSEDED,
        (JobState.FAILED, JobState.QUEUED): "manual retry: run again from the start",
        (JobState.FAILED, JobState.REPORTED): "manual retry of a delivery: outputs exist",
        (JobState.FAILED, JobState.SUPERSEDED): _SUPERSEDED,
    },
    terminal=frozenset({JobState.DELIVERED, JobState.SHADOW, JobState.FAILED, JobState.SUPERSEDED}),
)

#: Job states after which the job does no more work; entering one sets ``finished_at``.
TERMINAL_JOB_STATES = JOB.terminal

_STUDY_EVENTS = {
    StudyState.COMPLETE: EventType.STUDY_COMPLETE,
    StudyState.DISPATCHED: EventType.STUDY_DISPATCHED,
    StudyState.IGNORED: EventType.STUDY_IGNORED,
}


def _flush_for_id(session: Session, row: Study | Job) -> int:
    if row.id is None:
        session.add(row)
        session.flush()
    return row.id


@overload
def transition(
    session: Session,
    row: Job,
    to: JobState,
    detail: str | None = None,
    *,
    at: datetime | None = None,
    **event_detail: Any,
) -> JobTransition: ...


@overload
def transition(
    session: Session,
    row: Study,
    to: StudyState,
    detail: str | None = None,
    *,
    at: datetime | None = None,
    **event_detail: Any,
) -> Event: ...


def transition(
    session: Session,
    row: Study | Job,
    to: StudyState | JobState,
    detail: str | None = None,
    *,
    at: datetime | None = None,
    **event_detail: Any,
) -> JobTransition | Event:
    """Move ``row`` (a Study or a Job) to state ``to``, or raise :class:`TransitionError`.

    ``detail`` is the reason for the move; it is kept where the row keeps its reason
    (``completion_reason``, ``ignored_reason``, ``Job.error``) and in the records.
    ``event_detail`` adds entries to the event; ``at`` sets the time (recovery, imports,
    tests). A row not yet flushed (no id) is flushed, after its current state was read:
    its state is then None, and only the creation move is allowed. Returns the job's
    transition row or the study's event.
    """
    when = utcnow() if at is None else as_utc(at)
    if isinstance(row, Job):
        return _move_job(session, row, JobState(to), detail, when, event_detail)
    if isinstance(row, Study):
        return _move_study(session, row, StudyState(to), detail, when, event_detail)
    raise TypeError(f"expected a Study or a Job, got {type(row).__name__}")


def _extra(**detail: Any) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if v not in (None, "", [])}


def _move_job(
    session: Session,
    job: Job,
    to: JobState,
    detail: str | None,
    when: datetime,
    event_detail: dict[str, Any],
) -> JobTransition:
    previous = None if job.state is None else JobState(job.state)
    JOB.check(previous, to, job.id)
    job.state = to
    job_id = _flush_for_id(session, job)
    job.updated_at = when
    if to in JOB.terminal:
        if job.finished_at is None or previous not in JOB.terminal:
            job.finished_at = when  # the first finish counts (delivered, then superseded)
    elif previous in JOB.terminal:
        job.finished_at = None  # a retry: the job works again
    if to is JobState.FAILED and detail:
        job.error = detail
    elif previous is JobState.FAILED:
        job.error = None
    record = JobTransition(job_id=job_id, state=to, at=when, detail=detail)
    session.add(record)
    event = record_event(
        session,
        EventType.JOB_STATE,
        study_id=job.study_id,
        job_id=job_id,
        state=to.value,
        **_extra(previous=None if previous is None else previous.value, detail=detail),
        **event_detail,
    )
    event.at = when
    log.info(
        "job state",
        extra=fields(
            job_id=job_id,
            study_id=job.study_id,
            pipeline=job.pipeline,
            state=to.value,
            previous=None if previous is None else previous.value,
            detail=detail,
        ),
    )
    return record


def _move_study(
    session: Session,
    study: Study,
    to: StudyState,
    detail: str | None,
    when: datetime,
    event_detail: dict[str, Any],
) -> Event:
    previous = None if study.state is None else StudyState(study.state)
    STUDY.check(previous, to, study.id)
    study.state = to
    if previous is None:
        study.generation = study.generation or 1
        type_ = EventType.STUDY_RECEIVING
    elif to is StudyState.RECEIVING:
        # A late instance: the study is assembled again and re-run after the quiet
        # period; the new job supersedes the earlier one (docs/study-completion.md).
        study.generation = (study.generation or 1) + 1
        study.completed_at = None
        study.completion_reason = None
        study.ignored_reason = None
        type_ = EventType.STUDY_REOPENED
    else:
        type_ = _STUDY_EVENTS[to]
    if to is StudyState.COMPLETE:
        study.completed_at = when
        study.completion_reason = detail
    elif to is StudyState.IGNORED:
        study.ignored_reason = None if detail is None else detail[:2000]
    study_id = _flush_for_id(session, study)
    event = record_event(
        session,
        type_,
        study_id=study_id,
        state=to.value,
        **_extra(previous=None if previous is None else previous.value, reason=detail),
        generation=study.generation,
        **event_detail,
    )
    event.at = when
    log.info(
        "study state",
        extra=fields(
            study_id=study_id,
            state=to.value,
            previous=None if previous is None else previous.value,
            generation=study.generation,
            reason=detail,
        ),
    )
    return event
