"""The audit is the ledger of the queue: the reconciler makes the queue agree with it.

A job row is committed before its message is sent (:mod:`sijnode.daemon.dispatch`), so
the audit always knows which jobs are owed a message. The reconciler, a thread of the
node, looks every ``broker.reconcile_interval_seconds`` for

- **unsent** jobs: ``queued`` with no ``dispatched_at`` (the send failed, e.g. Redis was
  down, or the node died between the commit and the send);
- **unclaimed** jobs (broker mode): ``queued``, sent more than
  ``broker.unclaimed_after_seconds`` ago and still not claimed by a worker (the broker
  may have lost the message, e.g. Redis restarted without persistence);
- at start-up, the jobs the previous process owed: ``running`` jobs interrupted in the
  embedded worker, every ``queued`` job of the embedded queue (it lived in memory),
  ``no_model`` jobs whose pipeline now has a model, and ``inferred`` jobs (their worker
  was lost before the report step; the worker reports them from the saved result);

and sends each again, one short try, with exponential backoff per job
(``broker.retry_initial_seconds`` doubling up to ``broker.retry_max_seconds``). A failed
send ends the round: the broker is down, and the next round tries again. A job is never
sent while it is ``running`` on a Celery worker: ``acks_late`` returns the message of a
worker that died, and a second message would run the job twice.

It also closes association rows left ``active`` by a failed audit write (the database was
down when the association ended), with the counts of the rows that were stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pynetdicom.association import Association as PynetAssociation
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from sijnode.daemon.dispatch import Dispatcher, SendOutcome
from sijnode.daemon.metrics import NodeMetrics
from sijnode.db.engine import record_event, transaction
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    as_utc,
    utcnow,
)
from sijnode.errors import SijnodeError
from sijnode.logs import fields
from sijnode.settings import BrokerSettings

log = logging.getLogger(__name__)

#: (address, port) of a peer whose association is open now.
Peer = tuple[str, int | None]


@dataclass(frozen=True)
class ReconcileReport:
    """What one round of the reconciler did; every count is of real sends."""

    sent: int
    failed: int
    skipped: int
    waiting: int
    associations_closed: int = 0

    @property
    def anything(self) -> bool:
        """Whether the round did or found anything worth a log line."""
        return bool(self.sent or self.failed or self.skipped or self.associations_closed)


@dataclass
class _Backoff:
    failures: int = 0
    next_at: float = 0.0


@dataclass
class Reconciler:
    """Sends every job the audit says is owed a message; see the module docstring."""

    sessions: sessionmaker[Session]
    dispatcher: Dispatcher
    broker: BrokerSettings
    metrics: NodeMetrics
    #: True for a broker that can lose messages (Celery on Redis), False for the embedded
    #: worker, whose queue only a crash of this process loses.
    can_lose_messages: bool
    #: Whether a pipeline has a model now (``no_model`` jobs are sent again at start-up).
    has_model: Callable[[str], bool]
    #: Peers of the associations open now (rows of others left ``active`` are closed).
    live_peers: Callable[[], Collection[Peer]] = frozenset
    clock: Callable[[], float] = time.monotonic
    _owed: set[int] = field(default_factory=set, init=False)
    _backoff: dict[int, _Backoff] = field(default_factory=dict, init=False)

    # -- what is owed -------------------------------------------------------------------

    def owed_at_start(self) -> int:
        """Find the jobs the previous process owed a message (call before listening)."""
        # inferred: the worker was lost before the report step (it reports from the
        # saved result; building the same job's outputs again is harmless)
        sendable = [JobState.QUEUED, JobState.NO_MODEL, JobState.INFERRED]
        if not self.can_lose_messages:
            sendable.append(JobState.RUNNING)  # interrupted in this node's embedded worker
        with transaction(self.sessions) as session:
            rows = session.execute(
                select(Job.id, Job.state, Job.pipeline, Job.dispatched_at).where(
                    Job.state.in_(sendable)
                )
            ).all()
        for job_id, state, pipeline, dispatched_at in rows:
            if state is JobState.NO_MODEL and not self.has_model(pipeline):
                continue
            if state is JobState.QUEUED and self.can_lose_messages and dispatched_at is not None:
                continue  # the broker holds it (persistent Redis); unclaimed jobs come later
            self._owed.add(job_id)
        return len(self._owed)

    def _candidates(self, session: Session, now: datetime) -> list[int]:
        """Job ids owed a message now, oldest first."""
        settle = now - timedelta(seconds=self.broker.retry_initial_seconds)
        unsent = select(Job.id).where(
            Job.state == JobState.QUEUED,
            Job.dispatched_at.is_(None),
            Job.created_at <= settle,  # a new job's first send is the dispatcher's
        )
        ids = set(session.scalars(unsent).all())
        if self.can_lose_messages:
            stale = now - timedelta(seconds=self.broker.unclaimed_after_seconds)
            ids.update(
                session.scalars(
                    select(Job.id).where(
                        Job.state == JobState.QUEUED,
                        Job.dispatched_at.is_not(None),
                        Job.dispatched_at <= stale,
                    )
                ).all()
            )
        if self._owed:
            still = session.scalars(
                select(Job.id).where(
                    Job.id.in_(self._owed),
                    Job.state.in_(
                        [JobState.QUEUED, JobState.RUNNING, JobState.NO_MODEL, JobState.INFERRED]
                    ),
                )
            ).all()
            self._owed.intersection_update(still)
            ids.update(self._owed)
        return sorted(ids)

    def _still_owed(self, job: Job) -> bool:
        """Whether ``job``, read just before its send, still needs a message.

        A worker may have claimed it, or the completion loop sent it, since the round
        read its candidates; a message then would only be a second one.
        """
        owed = job.id in self._owed
        if owed and job.state in (JobState.NO_MODEL, JobState.INFERRED):
            return True
        if owed and job.state is JobState.RUNNING:
            return not self.can_lose_messages  # interrupted in the embedded worker
        if job.state is not JobState.QUEUED:
            return False
        if job.dispatched_at is None or (owed and not self.can_lose_messages):
            return True
        stale = utcnow() - timedelta(seconds=self.broker.unclaimed_after_seconds)
        return self.can_lose_messages and as_utc(job.dispatched_at) <= stale

    def unsent(self) -> int:
        """Queued jobs whose message the queue does not have (the ``jobs_unsent`` gauge)."""
        with transaction(self.sessions) as session:
            return int(
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.state == JobState.QUEUED, Job.dispatched_at.is_(None))
                )
                or 0
            )

    # -- one round ----------------------------------------------------------------------

    def _delay(self, failures: int) -> float:
        initial, cap = self.broker.retry_initial_seconds, self.broker.retry_max_seconds
        return float(min(cap, initial * 2 ** max(0, failures - 1)))

    def run_once(self) -> ReconcileReport:
        """One round: close stale associations, then send every due job (see module)."""
        closed = self.close_stale_associations()
        with transaction(self.sessions) as session:
            candidates = self._candidates(session, utcnow())
        now = self.clock()
        sent = failed = skipped = 0
        waiting = 0
        for index, job_id in enumerate(candidates):
            backoff = self._backoff.get(job_id)
            if backoff is not None and backoff.next_at > now:
                waiting += 1
                continue
            result = self.dispatcher.send(job_id, self._still_owed)
            self.metrics.job_sends.labels(outcome=result.outcome.value).inc()
            if result.outcome is SendOutcome.FAILED:
                failed += 1
                backoff = self._backoff.setdefault(job_id, _Backoff())
                backoff.failures += 1
                backoff.next_at = self.clock() + self._delay(backoff.failures)
                waiting += len(candidates) - index  # the broker is down: the rest waits
                break
            self._backoff.pop(job_id, None)
            self._owed.discard(job_id)
            if result.outcome is SendOutcome.SENT:
                sent += 1
            else:
                skipped += 1
        self.metrics.jobs_unsent.set(self.unsent())
        report = ReconcileReport(sent, failed, skipped, waiting, closed)
        if report.anything:
            log.info("queue reconciled with the audit", extra=fields(**report.__dict__))
        return report

    # -- associations left active -------------------------------------------------------

    def close_stale_associations(self, started_before: datetime | None = None) -> int:
        """Close ``active`` association rows of no open association, with true counts.

        A row stays ``active`` when the audit write at its end failed (the database was
        down). The rows are read first and the open associations after, so an association
        that opens in between is never taken for a stale one. ``started_before`` limits
        the rows (recovery: those of the previous process).
        """
        with transaction(self.sessions) as session:
            query = select(Association.id, Association.peer_address, Association.peer_port).where(
                Association.outcome == AssociationOutcome.ACTIVE
            )
            if started_before is not None:
                query = query.where(Association.started_at <= started_before)
            rows = session.execute(query).all()
        if not rows:
            return 0
        live = set(self.live_peers())
        stale = [row_id for row_id, address, port in rows if (address, port) not in live]
        if not stale:
            return 0
        with transaction(self.sessions) as session:
            for row_id in stale:
                _close_association(session, row_id)
        log.warning("closed association records left active", extra=fields(associations=stale))
        return len(stale)


def _close_association(session: Session, association_id: int) -> None:
    """Close one stale association row with the counts of what the audit holds of it."""
    row = session.get_one(Association, association_id)
    if row.outcome is not AssociationOutcome.ACTIVE:
        return
    stored, size, last = session.execute(
        select(
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.size_bytes), 0),
            func.max(Instance.received_at),
        ).where(Instance.association_id == association_id)
    ).one()

    def events(type_: EventType) -> int:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Event)
                .where(Event.association_id == association_id, Event.type == type_)
            )
            or 0
        )

    duplicates, refused = events(EventType.INSTANCE_DUPLICATE), events(EventType.INSTANCE_REFUSED)
    row.instances_received = int(stored) + duplicates
    row.instances_failed = refused
    row.bytes_received = int(size)
    row.outcome = AssociationOutcome.ABORTED
    row.ended_at = as_utc(last) if last is not None else as_utc(row.started_at)
    record_event(
        session,
        EventType.ASSOCIATION_CLOSED,
        association_id=association_id,
        outcome=AssociationOutcome.ABORTED.value,
        instances=row.instances_received,
        failed=refused,
        reason="left active by a failed audit write; closed from the stored rows",
    )


def run_forever(reconciler: Reconciler, interval: float, stop: threading.Event) -> None:
    """The reconciler thread: a round at once, then one every ``interval`` seconds."""
    while not stop.is_set():
        try:
            reconciler.run_once()
        except SijnodeError as exc:
            log.error("reconciling the queue failed; retrying", extra=fields(error=str(exc)))
        except Exception:  # the thread outlives a bug: the next round tries again
            log.exception("reconciling the queue raised; retrying")
        stop.wait(interval)


def peers_of(associations: Iterable[PynetAssociation]) -> frozenset[Peer]:
    """(address, port) of the peers of pynetdicom acceptor associations."""
    return frozenset((str(a.requestor.address), a.requestor.port) for a in associations)
