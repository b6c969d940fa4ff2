"""``sijnode worker``: a Celery worker that runs jobs from the broker, models kept loaded."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sijnode.settings import SettingsLoader


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``worker`` to the ``sijnode`` app; ``settings`` loads this invocation's settings."""

    @app.command("worker")
    def worker(
        queues: str = typer.Option(
            "",
            "--queues",
            "-Q",
            help="Pipelines (ct,mr) or queue names to read; default: every pipeline and "
            "broker.queue.",
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

        from sijnode.errors import ConfigurationError
        from sijnode.logs import configure_logging
        from sijnode.workers.celery_app import make_celery
        from sijnode.workers.queue import queue_pipelines, worker_queues

        loaded = settings()
        if not loaded.broker.url:
            raise ConfigurationError(
                "broker.url is empty: `sijnode worker` needs a broker "
                "(set SIJNODE_BROKER__URL=redis://...); without one, `sijnode serve` runs jobs "
                "itself"
            )
        configure_logging(loaded.logging.level, loaded.logging.json_format)
        celery = make_celery(loaded)
        celery.sijnode_device = device or None
        read = worker_queues(loaded, queues)
        pipelines = queue_pipelines(loaded, read)

        def _load_models(**_: object) -> None:
            celery.warm_up(pipelines)

        # solo: sent once in this process; prefork: once in each child (never per study)
        signals.worker_process_init.connect(_load_models, weak=False)
        celery.worker_main(
            argv=[
                "worker",
                f"--loglevel={loaded.logging.level}",
                f"--queues={','.join(read)}",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
