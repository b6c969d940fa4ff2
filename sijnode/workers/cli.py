"""``sijnode worker``: a Celery worker that runs jobs from the broker, models kept loaded."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``worker`` to the ``sijnode`` app."""
    app.command("worker")(worker)


def worker(
    ctx: typer.Context,
    queues: str = typer.Option(
        "",
        "--queues",
        "-Q",
        help="Pipelines (ct,mr) or queue names to read; default: every pipeline and broker.queue.",
    ),
    device: str = typer.Option(
        "",
        "--device",
        help="Torch device for every pipeline: cpu, cuda, cuda:N (default: each pipeline's).",
    ),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Jobs at a time."),
    pool: str = typer.Option(
        "solo", "--pool", help="Celery pool: solo keeps one process with models loaded."
    ),
) -> None:
    """Run jobs from the broker (needs broker.url); models load once and stay loaded.

    Run one worker process per GPU (``--device cuda:N``); ``--device cpu`` works anywhere.
    """
    from celery import signals

    from sijnode.cli import state
    from sijnode.errors import ConfigurationError
    from sijnode.logs import configure_logging
    from sijnode.workers.celery_app import make_celery
    from sijnode.workers.queue import queue_pipelines, worker_queues

    settings = state(ctx).settings()
    if not settings.broker.url:
        raise ConfigurationError(
            "broker.url is empty: `sijnode worker` needs a broker "
            "(set SIJNODE_BROKER__URL=redis://...); without one, `sijnode serve` runs jobs itself"
        )
    configure_logging(settings.logging.level, settings.logging.json_format)
    celery = make_celery(settings)
    celery.sijnode_device = device or None
    read = worker_queues(settings, queues)
    pipelines = queue_pipelines(settings, read)

    def _load_models(**_: object) -> None:
        celery.warm_up(pipelines)

    # solo: sent once in this process; prefork: once in each child (never per study)
    signals.worker_process_init.connect(_load_models, weak=False)
    celery.worker_main(
        argv=[
            "worker",
            f"--loglevel={settings.logging.level}",
            f"--queues={','.join(read)}",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
