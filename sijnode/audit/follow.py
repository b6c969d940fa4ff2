"""Waiting on a study's timeline: ``sijnode audit timeline STUDY --follow | --wait``.

Right after a send, a study is ``receiving``: the node decides it is complete from its
content (ImagesInAcquisition, InstanceNumber and slice-position continuity) after a short
quiet time, or after ``completion.quiet_seconds`` without a new instance
(docs/study-completion.md). These helpers poll the audit until the study reaches a stage
of its timeline (``complete``, ``inferred``, ``delivered``, ...) or is *done*: it has left
``receiving`` and none of its jobs is still on its way (queued, running, inferred, or
reported with a delivery still pending).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.audit.queries import StudyNotFoundError, study_timeline
from sijnode.db.schema import Delivery, DeliveryStatus, Job, JobState, Study, StudyState
from sijnode.errors import AuditError

#: The pseudo-stage "done": left receiving, no job still on its way.
DONE = "done"
#: Job states on the way to a result.
_MOVING = (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED)
_DELIVERY_OPEN = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.COMMITTING)


class TimelineTimeoutError(AuditError):
    """A study did not reach the awaited stage in time."""


@dataclass(frozen=True)
class Progress:
    """One look at a study: its timeline and whether the awaited stage is reached."""

    entries: list[dict[str, Any]]
    study_state: str | None
    reached: bool


def is_done(session: Session, study_uid: str) -> bool:
    """Whether the study left ``receiving`` and none of its jobs is still on its way."""
    study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
    if study is None or study.state is StudyState.RECEIVING:
        return False
    if study.state is StudyState.IGNORED:
        return True
    jobs = list(session.scalars(select(Job).where(Job.study_id == study.id)))
    if not jobs:
        return False  # complete, not yet routed
    for job in jobs:
        if job.state in _MOVING:
            return False
        if job.state is JobState.REPORTED:
            open_ = session.scalars(
                select(Delivery.id).where(
                    Delivery.job_id == job.id, Delivery.status.in_(_DELIVERY_OPEN)
                )
            ).first()
            if open_ is not None:
                return False
    return True


def look(session: Session, study_uid: str, until: str) -> Progress:
    """The study's timeline now, and whether ``until`` (a stage or ``done``) is reached."""
    try:
        entries = study_timeline(session, study_uid)
    except StudyNotFoundError:
        return Progress([], None, False)  # not arrived yet
    state = session.scalars(
        select(Study.state).where(Study.study_instance_uid == study_uid)
    ).first()
    if until == DONE:
        reached = is_done(session, study_uid)
    else:
        reached = any(e["stage"] == until for e in entries)
    return Progress(entries, None if state is None else StudyState(state).value, reached)


def _key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return (entry["stage"], entry["job_id"], entry["detail"], entry["at"])


def follow(
    sessions: Callable[[], AbstractContextManager[Session]],
    study_uid: str,
    until: str = DONE,
    timeout: float = 300.0,
    interval: float = 0.5,
) -> Iterator[list[dict[str, Any]]]:
    """Yield the timeline entries that are new at each look, until ``until`` is reached.

    ``last_received`` moves while instances arrive, so it is shown once the study has left
    ``receiving``. Raises :class:`TimelineTimeoutError` after ``timeout`` seconds, naming
    the study's state and its latest stage.
    """
    deadline = time.monotonic() + timeout
    shown: set[tuple[Any, ...]] = set()
    while True:
        with sessions() as session:
            progress = look(session, study_uid, until)
        receiving = progress.study_state in (None, StudyState.RECEIVING.value)
        new = [
            e
            for e in progress.entries
            if _key(e) not in shown and not (receiving and e["stage"] == "last_received")
        ]
        shown.update(_key(e) for e in new)
        if new:
            yield new
        if progress.reached:
            return
        if time.monotonic() >= deadline:
            latest = progress.entries[-1]["stage"] if progress.entries else "none"
            where = (
                "is not in the audit"
                if progress.study_state is None
                else f"is {progress.study_state}, latest stage {latest}"
            )
            raise TimelineTimeoutError(
                f"study {study_uid} did not reach {until!r} within {timeout:g} s: it {where}"
            )
        time.sleep(interval)
