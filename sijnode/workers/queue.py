"""Where job messages go: an in-process worker (embedded) or Celery on Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sijnode.errors import DispatchError
from sijnode.workers.messages import RUN_JOB_TASK, JobMessage

if TYPE_CHECKING:
    from celery import Celery


class JobQueue(Protocol):
    """Anything that accepts a job message; returns a task id."""

    def send(self, message: JobMessage) -> str:
        """Queue ``message``; raise DispatchError when it could not be queued."""
        ...


class CeleryQueue:
    """Sends job messages to Celery workers through the broker."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def send(self, message: JobMessage) -> str:
        """Send the run-job task with the message as its only argument."""
        try:
            result = self.app.send_task(
                RUN_JOB_TASK,
                kwargs={"message": message.model_dump(mode="json")},
                queue=self.queue,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:
            raise DispatchError(f"broker did not accept job {message.job_id}: {exc}") from exc
        return str(result.id)
