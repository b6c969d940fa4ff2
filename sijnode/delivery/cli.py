"""``sijnode deliveries list|retry``: the delivery queue and its dead-letter list."""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated

import typer

from sijnode.cli_context import add_group, group_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from sijnode.settings import SettingsLoader

deliveries_app = typer.Typer(help="Deliveries to PACS: the queue and the dead letters.")


class State(enum.StrEnum):
    """Delivery states (mirrors :class:`sijnode.db.schema.DeliveryStatus`)."""

    pending = "pending"
    retrying = "retrying"
    committing = "committing"
    delivered = "delivered"
    dead = "dead"
    shadow = "shadow"


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``deliveries`` to the ``sijnode`` app; ``settings`` loads this invocation's
    settings."""
    add_group(app, deliveries_app, "deliveries", settings)


@deliveries_app.command("list")
def list_deliveries(
    ctx: typer.Context,
    state_: Annotated[State | None, typer.Option("--state", help="Only this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List deliveries (job, study, destination, state, attempts, next try, last error)."""
    from sqlalchemy import select

    from sijnode.db.engine import transaction
    from sijnode.db.schema import Delivery, DeliveryStatus, Job, Study

    settings = group_settings(ctx)
    sessions = _sessions(settings.database.url)
    with transaction(sessions) as session:
        query = (
            select(Delivery, Study.study_instance_uid)
            .join(Job, Job.id == Delivery.job_id)
            .join(Study, Study.id == Job.study_id)
            .order_by(Delivery.id)
        )
        if state_ is not None:
            query = query.where(Delivery.status == DeliveryStatus(state_.value))
        rows = [
            {
                "id": d.id,
                "job_id": d.job_id,
                "study_instance_uid": uid,
                "destination": d.destination,
                "kind": d.kind,
                "state": d.status.value,
                "attempts": d.attempts,
                "next_attempt_at": None if d.next_attempt_at is None else str(d.next_attempt_at),
                "delivered_at": None if d.delivered_at is None else str(d.delivered_at),
                "committed_at": None if d.committed_at is None else str(d.committed_at),
                "instances": len(d.sop_instance_uids or []),
                "last_error": d.last_error,
            }
            for d, uid in session.execute(query).all()
        ]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no deliveries")
        return
    typer.echo(
        f"{'id':>5}  {'job':>5}  {'destination':<12} {'kind':<8} {'state':<10} "
        f"{'tries':>5}  {'next attempt':<26} last error"
    )
    for r in rows:
        typer.echo(
            f"{r['id']:>5}  {r['job_id']:>5}  {r['destination']:<12} {r['kind']:<8} "
            f"{r['state']:<10} {r['attempts']:>5}  {r['next_attempt_at'] or '-':<26} "
            f"{r['last_error'] or ''}"
        )


@deliveries_app.command("retry")
def retry(
    ctx: typer.Context,
    ids: Annotated[list[int] | None, typer.Argument(help="Delivery ids to send again.")] = None,
    all_dead: Annotated[
        bool, typer.Option("--all-dead", help="Every delivery on the dead-letter list.")
    ] = False,
    send: Annotated[
        bool,
        typer.Option("--send", help="Also try them now from this process (else: the node's loop)."),
    ] = False,
) -> None:
    """Put dead deliveries back in the queue with a fresh count of attempts."""
    from sijnode.db.engine import transaction
    from sijnode.delivery.scheduler import DeliveryScheduler, requeue
    from sijnode.errors import DeliveryError

    if bool(ids) == all_dead:
        raise DeliveryError(
            "expected delivery ids or --all-dead (one of the two), got both or neither"
        )
    settings = group_settings(ctx)
    sessions = _sessions(settings.database.url)
    with transaction(sessions) as session:
        queued = [d.id for d in requeue(session, ids or [], all_dead=all_dead)]
    typer.echo(f"re-queued {len(queued)} deliveries: {', '.join(map(str, queued)) or '-'}")
    if send and queued:
        scheduler = DeliveryScheduler(settings, sessions)
        for delivery_id in queued:
            result = scheduler.attempt(delivery_id)
            outcome = "not due" if result is None else result.outcome.value
            typer.echo(f"delivery {delivery_id}: {outcome}")


def _sessions(url: str) -> sessionmaker[Session]:
    from sijnode.db.engine import make_engine, make_sessionmaker
    from sijnode.db.migrate import check_schema_current

    engine = make_engine(url)
    check_schema_current(engine)
    return make_sessionmaker(engine)
