"""``sijnode worker``: a Celery worker that runs jobs from the broker."""

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
            "", "--queues", "-Q", help="Queues to read (default: broker.queue)."
        ),
        concurrency: int = typer.Option(1, "--concurrency", min=1, help="Jobs at a time."),
        pool: str = typer.Option(
            "solo", "--pool", help="Celery pool: solo keeps one process with models loaded."
        ),
    ) -> None:
        """Run jobs from the broker (needs broker.url); models stay loaded between jobs."""
        from sijnode.errors import ConfigurationError
        from sijnode.logs import configure_logging
        from sijnode.workers.celery_app import make_celery

        loaded = settings()
        if not loaded.broker.url:
            raise ConfigurationError(
                "broker.url is empty: `sijnode worker` needs a broker "
                "(set SIJNODE_BROKER__URL=redis://...); without one, `sijnode serve` runs jobs "
                "itself"
            )
        configure_logging(loaded.logging.level, loaded.logging.json_format)
        celery = make_celery(loaded)
        celery.worker_main(
            argv=[
                "worker",
                f"--loglevel={loaded.logging.level}",
                f"--queues={queues or loaded.broker.queue}",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
