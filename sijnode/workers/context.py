"""Build a worker's long-lived context from the settings (one engine per process)."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.models.identity import ModelIdentities
from sijnode.settings import Settings
from sijnode.workers.jobs import PipelineRunner, WorkerContext


def available_runners(settings: Settings) -> dict[str, PipelineRunner]:
    """The runner of every configured pipeline, by pipeline name.

    Every pipeline runs through :func:`sijnode.workers.inference.run_inference`, which
    picks the registered implementation (``sijnode.models.registry``) from the task of the
    pipeline's model; nothing is imported or loaded here (the listener builds this too).
    """
    from sijnode.workers.inference import run_inference

    return dict.fromkeys(settings.pipelines, run_inference)


def make_worker_context(
    settings: Settings,
    sessions: sessionmaker[Session] | None = None,
    models: ModelIdentities | None = None,
    device: str | None = None,
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
        settings,
        sessions,
        available_runners(settings),
        models or ModelIdentities(settings.pipelines, settings.data_dir),
        device=device,
    )
