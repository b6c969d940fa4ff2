"""``sijnode worker``: a Celery worker that runs jobs from the broker."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``worker`` to the ``sijnode`` app."""
    app.command("worker")(worker)


def worker(
    ctx: typer.Context,
    queues: str = typer.Option(
        "", "--queues", "-Q", help="Queues to read (default: broker.queue)."
    ),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Jobs at a time."),
    pool: str = typer.Option(
        "solo", "--pool", help="Celery pool: solo keeps one process with models loaded."
    ),
) -> None:
    """Run jobs from the broker (needs broker.url); models stay loaded between jobs."""
    from sijnode.cli import state
    from sijnode.errors import ConfigurationError
    from sijnode.logs import configure_logging
    from sijnode.workers.celery_app import make_celery

    settings = state(ctx).settings()
    if not settings.broker.url:
        raise ConfigurationError(
            "broker.url is empty: `sijnode worker` needs a broker "
            "(set SIJNODE_BROKER__URL=redis://...); without one, `sijnode serve` runs jobs itself"
        )
    configure_logging(settings.logging.level, settings.logging.json_format)
    celery = make_celery(settings)
    celery.worker_main(
        argv=[
            "worker",
            f"--loglevel={settings.logging.level}",
            f"--queues={queues or settings.broker.queue}",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
