"""Build a worker's long-lived context from the settings (one engine per process)."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.models.identity import ModelIdentities
from sijnode.settings import Settings
from sijnode.workers.jobs import PipelineRunner, WorkerContext


def available_runners() -> dict[str, PipelineRunner]:
    """The pipeline implementations this installation provides, by pipeline name.

    None ship yet: jobs end in the ``no_model`` state until the model pipelines land.
    """
    return {}


def make_worker_context(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    models: ModelIdentities | None = None,
) -> WorkerContext:
    """Sessions, pipelines and model identities for one worker (its own engine if none)."""
    if sessions is None:
        sessions = make_sessionmaker(
            make_engine(
                settings.database.url,
                echo=settings.database.echo,
                sqlite_synchronous=settings.database.sqlite_synchronous,
            )
        )
    return WorkerContext(
        settings, sessions, available_runners(), models or ModelIdentities(settings.pipelines)
    )
