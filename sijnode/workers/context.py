"""Build a worker's long-lived context from the settings (one engine per process)."""

from __future__ import annotations

from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.settings import Settings
from sijnode.workers.jobs import PipelineRunner, WorkerContext


def available_runners() -> dict[str, PipelineRunner]:
    """The pipeline implementations this installation provides, by pipeline name.

    None ship yet: jobs end in the ``no_model`` state until the model pipelines land.
    """
    return {}


def make_worker_context(settings: Settings) -> WorkerContext:
    """Engine, sessions and pipelines for one worker process."""
    engine = make_engine(settings.database.url, echo=settings.database.echo)
    return WorkerContext(settings, make_sessionmaker(engine), available_runners())
