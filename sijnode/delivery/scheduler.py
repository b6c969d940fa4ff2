"""The delivery loop: queue a job's deliveries, send what is due, record every outcome.

The schedule lives in the audit (``deliveries.status`` and ``next_attempt_at``), never in
memory, so a retry survives a restart: a new scheduler on the same database sends what
the old one left due. Transient failures back off exponentially from
``delivery.backoff_seconds``; permanent ones and the try after ``delivery.max_attempts``
go to the dead-letter list (``dead``), which ``sijnode deliveries retry`` re-queues.

The node runs it as a thread: ``DeliveryScheduler(settings, sessions).start()`` and
``stop()``; tests call :meth:`DeliveryScheduler.run_due` with their own clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import record_event, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import get_or_create_delivery, record_delivery_outcome
from sijnode.db.schema import (
    Delivery,
    DeliveryStatus,
    EventType,
    Job,
    JobState,
    Output,
    OutputKind,
    Prediction,
    as_utc,
    utcnow,
)
from sijnode.delivery.commitment import (
    CommitmentListener,
    CommitmentReport,
    CommitmentReportHandler,
)
from sijnode.delivery.metrics import DeliveryMetrics
from sijnode.delivery.objects import SRReencoder, from_file, relabel_sr
from sijnode.delivery.outcome import AttemptResult, Outcome
from sijnode.delivery.targets import (
    KIND_STOW,
    KIND_WEBHOOK,
    WEBHOOK_DESTINATION,
    DicomTarget,
    Plan,
    StowTarget,
    Target,
    WebhookTarget,
)
from sijnode.delivery.webhook import notification_body
from sijnode.errors import DeliveryError, SijnodeError
from sijnode.logs import fields
from sijnode.models.result import Decision
from sijnode.settings import DestinationSettings, RouteSettings, Settings

log = logging.getLogger(__name__)

#: Delivery states the loop sends (``committing`` only once its wait is over).
DUE_STATES = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.COMMITTING)
#: Jobs in these states move to ``delivered`` once every result delivery is delivered.
_DELIVERABLE_JOB_STATES = (JobState.INFERRED, JobState.REPORTED)
#: How long one attempt holds its delivery; a sender that dies mid-way frees it then.
CLAIM_SECONDS = 900
#: Outputs go SC before SR before KOS: the peer has the referenced objects first.
_KIND_ORDER = {OutputKind.SC: 0, OutputKind.SR: 1, OutputKind.KOS: 2}


def backoff_delay(settings: Settings, attempts: int) -> timedelta:
    """Delay after the ``attempts``-th failed try: backoff × 2^(attempts−1), capped."""
    d = settings.delivery
    seconds = min(d.backoff_seconds * 2 ** max(attempts - 1, 0), d.max_backoff_seconds)
    return timedelta(seconds=seconds)


def route_of(settings: Settings, job: Job) -> RouteSettings | None:
    """The route a job was created by, if it still exists in the settings."""
    return next((r for r in settings.routes if r.name == job.route), None)


def destinations_for(settings: Settings, job: Job) -> list[DestinationSettings]:
    """The destinations of the job's route; all destinations when it names none."""
    route = route_of(settings, job)
    names = route.destinations if route is not None else []
    if not names:
        return list(settings.destinations)
    return [d for d in settings.destinations if d.name in names]


def is_shadow(settings: Settings, job: Job) -> bool:
    """Shadow mode: global, for the job's route, or recorded on the job at dispatch."""
    route = route_of(settings, job)
    return bool(
        settings.delivery.shadow_mode or job.shadow or (route is not None and route.shadow_mode)
    )


def latest_prediction(session: Session, job: Job) -> Prediction | None:
    """The job's last recorded prediction (study or subject level)."""
    return session.scalars(
        select(Prediction).where(Prediction.job_id == job.id).order_by(Prediction.id.desc())
    ).first()


def output_paths(settings: Settings, session: Session, job: Job) -> list[Path]:
    """The files of the job's outputs, SC then SR then KOS; relative paths are taken
    relative to ``data_dir``."""
    outputs = session.scalars(select(Output).where(Output.job_id == job.id)).all()
    ordered = sorted(outputs, key=lambda o: (_KIND_ORDER.get(OutputKind(o.kind), 9), o.id))
    paths = []
    for out in ordered:
        if out.path is None:
            raise DeliveryError(
                f"expected a file for output {out.sop_instance_uid} of job {job.id}, got none"
            )
        path = Path(out.path)
        paths.append(path if path.is_absolute() else settings.data_dir / path)
    return paths


def enqueue_job(
    session: Session, settings: Settings, job: Job, *, now: datetime | None = None
) -> list[Delivery]:
    """Create the job's deliveries (one per destination, plus the webhook for a positive
    result), due now; in shadow mode record them as ``shadow`` and move the job to
    ``shadow``. Idempotent: existing deliveries are left as they are."""
    now = as_utc(now or utcnow())
    shadow = is_shadow(settings, job)
    targets: list[tuple[str, str]] = [(d.name, d.kind) for d in destinations_for(settings, job)]
    prediction = latest_prediction(session, job)
    if settings.delivery.webhook.url and prediction is not None and prediction.label:
        targets.append((WEBHOOK_DESTINATION, KIND_WEBHOOK))
    uids = [
        o.sop_instance_uid
        for o in session.scalars(select(Output).where(Output.job_id == job.id)).all()
    ]
    out: list[Delivery] = []
    for name, kind in targets:
        existing = session.scalars(
            select(Delivery).where(Delivery.job_id == job.id, Delivery.destination == name)
        ).first()
        if existing is not None:
            out.append(existing)
            continue
        delivery = get_or_create_delivery(session, job, name, at=now)
        delivery.kind = kind
        delivery.sop_instance_uids = []
        if shadow:
            record_delivery_outcome(
                session,
                delivery,
                "shadow",
                DeliveryStatus.SHADOW,
                sop_instance_uids=[] if kind == KIND_WEBHOOK else uids,
                count_attempt=False,
                at=now,
            )
        else:
            delivery.next_attempt_at = now
        out.append(delivery)
    if shadow and job.state in _DELIVERABLE_JOB_STATES:
        transition(session, job, JobState.SHADOW, "shadow mode: nothing sent", at=now)
    log.info(
        "deliveries queued",
        extra=fields(
            job_id=job.id, deliveries=[d.destination for d in out], shadow=shadow, outputs=len(uids)
        ),
    )
    return out


def finish_job_if_delivered(session: Session, job: Job, *, at: datetime | None = None) -> bool:
    """Move the job to ``delivered`` once every result delivery (not the webhook) is."""
    deliveries = session.scalars(
        select(Delivery).where(Delivery.job_id == job.id, Delivery.kind != KIND_WEBHOOK)
    ).all()
    if not deliveries or job.state not in _DELIVERABLE_JOB_STATES:
        return False
    if any(d.status is not DeliveryStatus.DELIVERED for d in deliveries):
        return False
    transition(
        session,
        job,
        JobState.DELIVERED,
        "delivered to " + ", ".join(sorted(d.destination for d in deliveries)),
        at=at,
    )
    return True


def requeue(
    session: Session,
    delivery_ids: Sequence[int] = (),
    *,
    all_dead: bool = False,
    now: datetime | None = None,
) -> list[Delivery]:
    """Put dead (or given) deliveries back in the queue, due now, with a fresh count of
    attempts; what was acknowledged is kept, so only the rest is sent again."""
    now = as_utc(now or utcnow())
    query = select(Delivery)
    if all_dead:
        query = query.where(Delivery.status == DeliveryStatus.DEAD)
    else:
        query = query.where(Delivery.id.in_(list(delivery_ids)))
    rows = list(session.scalars(query.order_by(Delivery.id)).all())
    missing = sorted(set(delivery_ids) - {d.id for d in rows})
    if missing:
        raise DeliveryError(f"expected existing delivery ids, got unknown {missing}")
    for d in rows:
        if d.status in (DeliveryStatus.DELIVERED, DeliveryStatus.SHADOW):
            raise DeliveryError(
                f"delivery {d.id} is {d.status.value}; only undelivered ones can be retried"
            )
    for d in rows:
        previous = d.status
        d.status = DeliveryStatus.PENDING
        d.attempts = 0
        d.next_attempt_at = now
        event = record_event(
            session,
            EventType.DELIVERY_REQUEUED,
            study_id=d.job.study_id,
            job_id=d.job_id,
            delivery_id=d.id,
            destination=d.destination,
            previous=previous.value,
        )
        event.at = now
    return rows


class DeliveryScheduler:
    """Sends due deliveries in a background thread; every decision is in the audit."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        registry: CollectorRegistry | None = None,
        sr_reencoder: SRReencoder = relabel_sr,
        commitment_wait_seconds: float = 10.0,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.metrics = DeliveryMetrics(registry)
        self.sr_reencoder = sr_reencoder
        self.commitment_wait_seconds = commitment_wait_seconds
        self.commitment_handler = CommitmentReportHandler(self.on_commitment_report)
        self.listener: CommitmentListener | None = None
        if settings.delivery.commitment_port:
            self.listener = CommitmentListener(
                settings.node.ae_title,
                settings.node.bind_address,
                settings.delivery.commitment_port,
                self.on_commitment_report,
                [d.ae_title for d in settings.destinations if d.storage_commitment],
            )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the commitment listener (if it has a port) and the loop thread."""
        if self._thread is not None:
            return
        if self.listener is not None:
            self.listener.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sijnode-delivery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after the attempt in hand, and the listener."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        if self.listener is not None:
            self.listener.stop()

    def wake(self) -> None:
        """Look for due deliveries now (e.g. right after :func:`enqueue_job`)."""
        self._wake.set()

    def _loop(self) -> None:
        interval = self.settings.delivery.check_interval_seconds
        while not self._stop.is_set():
            try:
                self.run_due()
            except SijnodeError as exc:
                log.error("delivery loop failed; retrying", extra=fields(error=str(exc)))
            except Exception:  # the loop outlives any one bad delivery; the trace is logged
                log.exception("delivery loop error; retrying")
            self._wake.wait(interval)
            self._wake.clear()

    # -- queueing -------------------------------------------------------------------------

    def enqueue(self, job_id: int, now: datetime | None = None) -> list[int]:
        """Queue the deliveries of job ``job_id``; return their ids."""
        with transaction(self.sessions) as session:
            job = session.get(Job, job_id)
            if job is None:
                raise DeliveryError(f"expected an existing job id, got {job_id}")
            ids = [d.id for d in enqueue_job(session, self.settings, job, now=now)]
        self.wake()
        return ids

    # -- sending --------------------------------------------------------------------------

    def due(self, now: datetime | None = None) -> list[int]:
        """Ids of the deliveries due at ``now`` (pending, retrying or awaiting commitment
        past its wait), oldest first."""
        now = as_utc(now or utcnow())
        with transaction(self.sessions) as session:
            rows = session.execute(
                select(Delivery.id, Delivery.status, Delivery.next_attempt_at)
                .where(Delivery.status.in_(DUE_STATES))
                .order_by(Delivery.id)
            ).all()
        due = []
        for delivery_id, status, next_at in rows:
            if next_at is None and status is not DeliveryStatus.COMMITTING:
                due.append(delivery_id)
            elif next_at is not None and as_utc(next_at) <= now:
                due.append(delivery_id)
        return due

    def run_due(self, now: datetime | None = None) -> list[int]:
        """Send every delivery due at ``now``; return the ids attempted."""
        done = []
        for delivery_id in self.due(now):
            if self._stop.is_set() and self._thread is not None:
                break
            self.attempt(delivery_id, now)
            done.append(delivery_id)
        return done

    def attempt(self, delivery_id: int, now: datetime | None = None) -> AttemptResult | None:
        """One try of one delivery: plan in one transaction, send outside any, record.

        ``now`` (tests) fixes the clock that the next attempt is scheduled from; by
        default it is the time the attempt ends."""
        fixed = None if now is None else as_utc(now)
        with transaction(self.sessions) as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None or delivery.status not in DUE_STATES:
                return None
            if delivery.status is DeliveryStatus.COMMITTING:
                waited = delivery.next_attempt_at
                if waited is not None and as_utc(waited) <= (fixed or utcnow()):
                    self._commitment_timed_out(session, delivery, fixed or utcnow())
                return None
            due = delivery.next_attempt_at
            if due is not None and as_utc(due) > (fixed or utcnow()):
                return None  # not due, or claimed by another sender whose claim committed
            planned = self._plan(session, delivery)
            kind = delivery.kind
            if isinstance(planned, AttemptResult):
                when = fixed or utcnow()
                self._record(session, delivery, planned, when, when)
                return planned
            plan, target = planned
            if not self._claim(session, delivery, plan, fixed or utcnow()):
                return None  # another scheduler (e.g. `deliveries retry --send`) has it
        started = utcnow()
        t0 = time.perf_counter()
        try:
            result = target.send(plan)
        except OSError as exc:  # e.g. a host name that does not resolve (yet)
            result = AttemptResult(Outcome.TRANSIENT, error=f"{type(exc).__name__}: {exc}")
        except (SijnodeError, ValueError) as exc:  # an object that cannot be encoded or built
            result = AttemptResult(
                Outcome.PERMANENT, error=f"could not send: {type(exc).__name__}: {exc}"
            )
        except Exception as exc:  # recorded and retried (bounded), never lost
            log.exception("unexpected error while sending", extra=fields(delivery_id=delivery_id))
            result = AttemptResult(
                Outcome.TRANSIENT, error=f"unexpected {type(exc).__name__}: {exc}"
            )
        self.metrics.seconds.labels(kind=kind).observe(time.perf_counter() - t0)
        with transaction(self.sessions) as session:
            delivery = session.get(Delivery, delivery_id)
            if delivery is None:
                raise DeliveryError(f"delivery {delivery_id} disappeared while it was sent")
            self._record(session, delivery, result, fixed or utcnow(), started)
        return result

    def _claim(self, session: Session, delivery: Delivery, plan: Plan, now: datetime) -> bool:
        """Take the delivery for this attempt, atomically: push its next attempt out by
        :data:`CLAIM_SECONDS` only if nobody changed it since it was read, and write the
        commitment Transaction UID (before sending, so a report that comes back at once
        finds its delivery). A sender that dies mid-way leaves it due again after the
        claim runs out."""
        read = delivery.next_attempt_at
        unchanged = (
            Delivery.next_attempt_at.is_(None)
            if read is None
            else (Delivery.next_attempt_at == read)
        )
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id, Delivery.status == delivery.status, unchanged)
            .values(
                next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS),
                commitment_transaction_uid=plan.commitment_transaction_uid,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(claimed.rowcount == 1)  # type: ignore[attr-defined]

    def _plan(self, session: Session, delivery: Delivery) -> tuple[Plan, Target] | AttemptResult:
        job = delivery.job
        if job.state is JobState.SUPERSEDED:
            return AttemptResult(
                Outcome.PERMANENT,
                error=(
                    f"job {job.id} was superseded by job {job.superseded_by_id} before this "
                    f"delivery; its results are not sent"
                ),
            )
        plan = Plan(
            delivery_id=delivery.id,
            job_id=job.id,
            destination=delivery.destination,
            kind=delivery.kind,
            attempt=(delivery.attempts or 0) + 1,
            already_acknowledged=list(delivery.sop_instance_uids or []),
        )
        if delivery.kind == KIND_WEBHOOK:
            body = self._webhook_body(session, job)
            if isinstance(body, AttemptResult):
                return body
            plan.body = body
            return plan, WebhookTarget(self.settings.delivery.webhook)
        dest = next((d for d in self.settings.destinations if d.name == delivery.destination), None)
        if dest is None:
            return AttemptResult(
                Outcome.PERMANENT,
                error=f"destination {delivery.destination!r} is not in the settings any more",
            )
        try:
            plan.output_paths = output_paths(self.settings, session, job)
        except DeliveryError as exc:
            return AttemptResult(Outcome.PERMANENT, error=str(exc))

        def loader(path: Path) -> Any:
            return from_file(path, sr_reencoder=self.sr_reencoder)

        if dest.kind == KIND_STOW:
            return plan, StowTarget(dest, loader=loader)
        if dest.storage_commitment:
            plan.commitment_transaction_uid = generate_uid(prefix=self.settings.node.uid_root)
        return plan, DicomTarget(dest, self.settings.node.ae_title, loader=loader)

    def _webhook_body(self, session: Session, job: Job) -> dict[str, Any] | AttemptResult:
        prediction = latest_prediction(session, job)
        if prediction is None:
            return AttemptResult(Outcome.PERMANENT, error=f"job {job.id} has no prediction")
        accession = None
        if self.settings.delivery.webhook.include_accession_number and job.spool_paths:
            path = self.settings.storage.spool_dir / job.spool_paths[0]
            try:
                header = dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
            except (OSError, InvalidDicomError) as exc:
                return AttemptResult(
                    Outcome.TRANSIENT, error=f"could not read the accession number: {exc}"
                )
            accession = str(header.get("AccessionNumber", "")) or None
        return notification_body(
            study_instance_uid=job.study.study_instance_uid,
            pipeline=job.pipeline,
            decision=(Decision.PRESENT if prediction.label else Decision.ABSENT).value,
            probability=prediction.probability,
            model_version=job.model_version,
            accession_number=accession,
        )

    # -- recording ------------------------------------------------------------------------

    def _record(
        self,
        session: Session,
        delivery: Delivery,
        result: AttemptResult,
        now: datetime,
        started: datetime,
    ) -> None:
        attempts = (delivery.attempts or 0) + 1
        acknowledged = list(
            dict.fromkeys([*(delivery.sop_instance_uids or []), *result.acknowledged])
        )
        delivery.sop_instance_uids = acknowledged
        next_at: datetime | None = None
        if result.outcome is Outcome.DELIVERED:
            status = DeliveryStatus.DELIVERED
        elif result.outcome is Outcome.COMMITTING:
            status = DeliveryStatus.COMMITTING
            next_at = now + timedelta(seconds=self.settings.delivery.commitment_timeout_seconds)
        elif result.outcome is Outcome.TRANSIENT and attempts < self.settings.delivery.max_attempts:
            status = DeliveryStatus.RETRYING
            next_at = now + backoff_delay(self.settings, attempts)
        else:
            status = DeliveryStatus.DEAD
        error = result.error
        if status is DeliveryStatus.DEAD and result.outcome is Outcome.TRANSIENT:
            error = f"{error} (gave up after {attempts} attempts)"
        record_delivery_outcome(
            session,
            delivery,
            result.outcome.value,
            status,
            started_at=started,
            error=error,
            status_code=result.status,
            sop_instance_uids=result.acknowledged,
            next_attempt_at=next_at,
            at=now,
        )
        self.metrics.attempts.labels(kind=delivery.kind, outcome=result.outcome.value).inc()
        if status is DeliveryStatus.DEAD:
            self.metrics.dead.labels(kind=delivery.kind).inc()
        if status is DeliveryStatus.DELIVERED:
            finish_job_if_delivered(session, delivery.job)
        log.log(
            logging.WARNING if status is DeliveryStatus.DEAD else logging.INFO,
            "delivery attempt",
            extra=fields(
                delivery_id=delivery.id,
                job_id=delivery.job_id,
                destination=delivery.destination,
                kind=delivery.kind,
                attempt=delivery.attempts,
                outcome=result.outcome.value,
                status=status.value,
                acknowledged=len(result.acknowledged),
                error=error,
            ),
        )

    def _commitment_timed_out(self, session: Session, delivery: Delivery, now: datetime) -> None:
        wait = self.settings.delivery.commitment_timeout_seconds
        result = AttemptResult(
            Outcome.TRANSIENT,
            error=f"no Storage Commitment report within {wait:g} s; asking again",
        )
        self._apply_commitment_failure(session, delivery, result, now)

    def _apply_commitment_failure(
        self, session: Session, delivery: Delivery, result: AttemptResult, now: datetime
    ) -> None:
        attempts = delivery.attempts or 0
        if attempts < self.settings.delivery.max_attempts:
            status, next_at = DeliveryStatus.RETRYING, now + backoff_delay(self.settings, attempts)
        else:
            status, next_at = DeliveryStatus.DEAD, None
            self.metrics.dead.labels(kind=delivery.kind).inc()
        record_delivery_outcome(
            session,
            delivery,
            result.outcome.value,
            status,
            error=result.error,
            next_attempt_at=next_at,
            count_attempt=False,
            at=now,
        )

    def on_commitment_report(self, report: CommitmentReport) -> bool:
        """Record an N-EVENT-REPORT: ``delivered`` (committed) when it lists every object;
        otherwise the uncommitted ones are sent again after the backoff. Returns False for
        a transaction this node does not await."""
        deadline = time.monotonic() + self.commitment_wait_seconds
        while True:
            with transaction(self.sessions) as session:
                delivery = session.scalars(
                    select(Delivery).where(
                        Delivery.commitment_transaction_uid == report.transaction_uid
                    )
                ).first()
                if delivery is None:
                    self._record_unknown(session, report, "no delivery awaits this transaction")
                    return False
                if delivery.committed_at is not None:
                    return True  # the same report twice
                if delivery.status is DeliveryStatus.COMMITTING:
                    self._apply_report(session, delivery, report)
                    return True
                if time.monotonic() > deadline:
                    self._record_unknown(
                        session,
                        report,
                        f"delivery {delivery.id} is {delivery.status.value}, not committing",
                        delivery,
                    )
                    return False
            time.sleep(0.05)  # the N-ACTION's own record is still being written

    def _record_unknown(
        self,
        session: Session,
        report: CommitmentReport,
        reason: str,
        delivery: Delivery | None = None,
    ) -> None:
        """A ``commitment_unknown`` event: the report is answered 0x0110 (the peer sends it
        again), and the audit says who sent what for which transaction, and why."""
        self.metrics.commitments.labels(result="unknown").inc()
        job = None if delivery is None else delivery.job
        record_event(
            session,
            EventType.COMMITMENT_UNKNOWN,
            study_id=None if job is None else job.study_id,
            job_id=None if job is None else job.id,
            transaction_uid=report.transaction_uid,
            reason=reason,
            committed=len(report.committed),
            failed=len(report.failed),
            calling_ae_title=report.calling_ae_title,
            peer_address=report.peer_address,
            **({} if delivery is None else {"delivery_id": delivery.id}),
        )
        log.warning(
            "storage commitment report for an unknown transaction",
            extra=fields(transaction_uid=report.transaction_uid, reason=reason),
        )

    def _apply_report(self, session: Session, delivery: Delivery, report: CommitmentReport) -> None:
        now = as_utc(utcnow())
        expected = list(delivery.sop_instance_uids or [])
        committed = set(report.committed)
        failed = dict(report.failed)
        missing = [uid for uid in expected if uid not in committed or uid in failed]
        if not missing:
            delivery.committed_at = now
            record_delivery_outcome(
                session,
                delivery,
                "committed",
                DeliveryStatus.DELIVERED,
                sop_instance_uids=expected,
                count_attempt=False,
                at=now,
            )
            self.metrics.commitments.labels(result="committed").inc()
            finish_job_if_delivered(session, delivery.job)
            return
        self.metrics.commitments.labels(result="failed").inc()
        delivery.sop_instance_uids = [uid for uid in expected if uid not in missing]
        reasons = ", ".join(
            f"{uid} (0x{failed[uid]:04X})" if failed.get(uid) is not None else uid
            for uid in missing
        )
        result = AttemptResult(
            Outcome.TRANSIENT,
            error=f"the peer did not commit {len(missing)} of {len(expected)}: {reasons}",
        )
        self._apply_commitment_failure(session, delivery, result, now)
