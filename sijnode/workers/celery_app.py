"""The Celery application: one job task, acknowledged late, models kept loaded.

``task_acks_late`` with ``task_reject_on_worker_lost`` returns a message to the broker
when a worker dies mid-job, and the task is idempotent (:func:`execute_job`), so a
re-delivery is harmless. Each worker process builds its context once, on its first task,
and keeps it (with loaded models) for its life.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from sijnode.settings import Settings
from sijnode.workers.jobs import WorkerContext, execute_job
from sijnode.workers.messages import RUN_JOB_TASK, JobMessage


class _SijnodeCelery(Celery):
    """Celery app that carries the node's settings and the worker's context."""

    sijnode_settings: Settings
    sijnode_context: WorkerContext | None = None

    def worker_context(self) -> WorkerContext:
        """The process's worker context, built on first use."""
        if self.sijnode_context is None:
            from sijnode.workers.context import make_worker_context

            self.sijnode_context = make_worker_context(self.sijnode_settings)
        return self.sijnode_context


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app for ``settings.broker``."""
    app = _SijnodeCelery(
        "sijnode",
        broker=settings.broker.url,
        backend=settings.broker.result_backend or None,
        set_as_current=False,
    )
    app.sijnode_settings = settings
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.broker.queue,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=not settings.broker.result_backend,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )

    @app.task(name=RUN_JOB_TASK, bind=True, acks_late=True)
    def run_job(task: Task, message: dict[str, Any]) -> str:
        job = JobMessage.model_validate(message)
        return execute_job(app.worker_context(), job.job_id).value

    return app
