"""The job lease: one worker run holds a running job at a time.

A worker that claims a job (``queued``/``no_model`` → ``running``, or an ``inferred`` job
for its report) writes a fresh random ``jobs.lease_token`` and ``jobs.lease_expires_at`` =
now + ``broker.lease_seconds`` in the claim's transaction, and a heartbeat thread renews
the expiry every third of that while the job runs; the lease is released (both columns
cleared) when the run ends. A second message for a job that is ``running`` or
``inferred`` under a **live** lease is a duplicate (a re-send, or Redis handing out the
message again after its visibility timeout while the first worker still runs it): it
waits for the lease and does not run the job. A **lapsed** lease means its holder died
(``kill -9``, a lost host) and stopped renewing it: the waiting message then runs the job
again, once, under a new token. The holder's writes (the result, ``no_model``/``failed``)
are checked against its own token, so a holder that only stalled past its lease records
nothing once another run took the job over. The embedded worker, which sees its child
die, releases the dead child's lease at once (:func:`release_lease`).

The expiry is written with the writing host's clock: keep ``broker.lease_seconds`` well
above the clock skew between worker hosts (NTP).
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta
from types import TracebackType

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import transaction
from sijnode.db.schema import Job, JobState, as_utc, utcnow
from sijnode.logs import fields

log = logging.getLogger(__name__)

#: States in which a job is held by a worker run, under its lease.
LEASED_STATES = frozenset({JobState.RUNNING, JobState.INFERRED})


def new_token() -> str:
    """A random lease token (32 hex digits)."""
    return uuid.uuid4().hex


def take_lease(job: Job, token: str, seconds: float, now: datetime | None = None) -> None:
    """Write the lease of ``token`` on ``job`` (in the caller's claim transaction)."""
    job.lease_token = token
    job.lease_expires_at = (now or utcnow()) + timedelta(seconds=seconds)


def lease_left(job: Job, now: datetime | None = None) -> float:
    """Seconds until ``job``'s lease lapses; 0 when it has none or it has lapsed."""
    if job.lease_token is None or job.lease_expires_at is None:
        return 0.0
    left = (as_utc(job.lease_expires_at) - (now or utcnow())).total_seconds()
    return max(0.0, left)


def release_lease(sessions: sessionmaker[Session], job_id: int, token: str | None = None) -> bool:
    """Clear the lease of job ``job_id`` (only if ``token`` holds it, when given).

    Returns whether a lease was cleared. ``updated_at`` is left as it is: a lease is not a
    change of the job.
    """
    statement = update(Job).where(Job.id == job_id, Job.lease_token.is_not(None))
    if token is not None:
        statement = statement.where(Job.lease_token == token)
    with transaction(sessions) as session:
        result = session.execute(
            statement.values(lease_token=None, lease_expires_at=None, updated_at=Job.updated_at)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def release_all_leases(sessions: sessionmaker[Session]) -> int:
    """Clear every lease (the embedded worker at start: no run of an earlier process
    lives on). Returns how many were cleared."""
    with transaction(sessions) as session:
        result = session.execute(
            update(Job)
            .where(Job.lease_token.is_not(None))
            .values(lease_token=None, lease_expires_at=None, updated_at=Job.updated_at)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


class Lease:
    """Renews the lease of ``token`` on job ``job_id`` while the ``with`` block runs, and
    releases it at the end (also when the block raises)."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: int, token: str, seconds: float
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.token = token
        self.seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"sijnode-lease-{job_id}", daemon=True
        )
        #: False once a renewal found the lease taken over (another run holds the job).
        self.held = True

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        try:
            release_lease(self.sessions, self.job_id, self.token)
        except SQLAlchemyError as error:  # it lapses by itself; never mask the block's error
            log.warning(
                "job lease not released", extra=fields(job_id=self.job_id, error=str(error))
            )

    def renew(self) -> bool:
        """Push the expiry on by ``seconds``; False when the token no longer holds the job."""
        expires = utcnow() + timedelta(seconds=self.seconds)
        with transaction(self.sessions) as session:
            result = session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.lease_token == self.token)
                .values(lease_expires_at=expires, updated_at=Job.updated_at)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                if not self.renew():
                    self.held = False
                    log.warning(
                        "job lease taken over: another run holds the job",
                        extra=fields(job_id=self.job_id),
                    )
                    return
            except SQLAlchemyError as error:  # the next beat tries again
                log.warning(
                    "job lease not renewed", extra=fields(job_id=self.job_id, error=str(error))
                )
