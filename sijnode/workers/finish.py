"""How a job's run ends in the audit: one function for every final move of a worker.

:func:`finish_job` moves a job to the state its run ended in (``no_model``, ``failed``),
unless it moved on meanwhile (superseded while running) or, given the run's lease token,
another run took it over (:mod:`sijnode.workers.lease`). :func:`fail_unfinished` fails a
job whose run raised unexpectedly and left it ``queued``, ``running`` or ``inferred``.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.schema import Job, JobState
from sijnode.errors import TransitionError
from sijnode.logs import fields
from sijnode.workers.lease import lease_left

log = logging.getLogger(__name__)

#: States a job can be stuck in when its run raised unexpectedly; such a job is failed.
UNFINISHED_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.INFERRED})


def fail_unfinished(
    sessions: sessionmaker[Session], job_id: int, reason: str, token: str | None = None
) -> bool:
    """Fail job ``job_id`` with ``reason`` if it is still queued, running or inferred and
    no other run holds it (a live lease of another token than ``token``).

    Returns whether it was failed (False: no such job, it moved on, or another run has it).
    """
    with transaction(sessions) as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state not in UNFINISHED_STATES:
            return False
        if job.lease_token not in (None, token) and lease_left(job) > 0:
            return False
        job.lease_token = job.lease_expires_at = None
        transition(session, job, JobState.FAILED, reason)
    log.error("job failed", extra=fields(job_id=job_id, error=reason))
    return True


def finish_job(
    sessions: sessionmaker[Session],
    job_id: int,
    state: JobState,
    reason: str,
    *,
    token: str | None = None,
) -> JobState:
    """Move job ``job_id`` to ``state`` with ``reason``; return the state it is in after.

    The job keeps the state it has when it moved on meanwhile (superseded while it ran:
    the lifecycle refuses the move) or, with ``token``, when another run holds its lease.
    """
    with transaction(sessions) as session:
        job = session.get_one(Job, job_id, with_for_update=True)
        if token is not None and job.lease_token != token:
            log.warning(
                "job taken over by another run; its state is kept",
                extra=fields(job_id=job_id, state=job.state.value),
            )
            return JobState(job.state)
        try:
            transition(session, job, state, reason)
        except TransitionError as exc:
            log.warning(
                "job moved on while it ran; its state is kept",
                extra=fields(job_id=job_id, state=job.state.value, error=str(exc)),
            )
        return JobState(job.state)
