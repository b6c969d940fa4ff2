"""Where job messages go: an embedded worker (child process) or Celery on Redis.

Each pipeline has its own Celery queue (``pipelines.<name>.queue``, default
``sijnode.<name>``), so GPU hosts can serve only the pipelines whose models they hold;
``broker.queue`` (``sijnode.jobs``) carries the jobs of a pipeline without a queue entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sijnode.errors import DispatchError
from sijnode.settings import Settings
from sijnode.workers.messages import RUN_JOB_TASK, JobMessage

if TYPE_CHECKING:
    from celery import Celery


def pipeline_queue(settings: Settings, pipeline: str) -> str:
    """The Celery queue of ``pipeline``'s jobs."""
    configured = settings.pipelines.get(pipeline)
    if configured is None:
        return settings.broker.queue
    return configured.queue or f"sijnode.{pipeline}"


def worker_queues(settings: Settings, names: str = "") -> list[str]:
    """Queues a worker reads: ``ct,mr`` are pipeline names, anything else a queue name.

    Empty: every pipeline's queue and ``broker.queue``.
    """
    items = [n.strip() for n in names.split(",") if n.strip()]
    if not items:
        items = [*settings.pipelines, settings.broker.queue]
    queues = [pipeline_queue(settings, n) if n in settings.pipelines else n for n in items]
    return list(dict.fromkeys(queues))


def queue_pipelines(settings: Settings, queues: list[str]) -> list[str]:
    """The pipelines whose jobs arrive on ``queues`` (the models a worker loads)."""
    return [name for name in settings.pipelines if pipeline_queue(settings, name) in queues]


class JobQueue(Protocol):
    """Anything that accepts a job message; returns a task id."""

    def send(self, message: JobMessage) -> str:
        """Queue ``message``; raise DispatchError when it could not be queued."""
        ...


class CeleryQueue:
    """Sends job messages to Celery workers through the broker, on the pipeline's queue."""

    def __init__(self, app: Celery, queue: str, settings: Settings | None = None) -> None:
        self.app = app
        self.queue = queue
        self.settings: Settings | None = settings or getattr(app, "sijnode_settings", None)

    def queue_for(self, pipeline: str) -> str:
        """The queue a job of ``pipeline`` is sent to."""
        if self.settings is None:
            return self.queue
        return pipeline_queue(self.settings, pipeline)

    def send(self, message: JobMessage) -> str:
        """Send the run-job task with the message as its only argument."""
        try:
            result = self.app.send_task(
                RUN_JOB_TASK,
                kwargs={"message": message.model_dump(mode="json")},
                queue=self.queue_for(message.pipeline),
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            raise DispatchError(f"broker did not accept job {message.job_id}: {exc}") from exc
        return str(result.id)
