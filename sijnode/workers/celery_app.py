"""The Celery application: one job task, acknowledged late, models kept loaded.

``task_acks_late`` with ``task_reject_on_worker_lost`` returns a message to the broker
when a worker dies mid-job (``kill -9``), and the task is idempotent
(:func:`~sijnode.workers.jobs.execute_job`), so a re-delivery records no second result.
Redis hands an unacknowledged message to another worker after
``broker.visibility_timeout_seconds``, which must exceed the longest job. Prefetch 1: a
worker holds no message it is not running. Each worker process builds its context and
loads its pipelines' models once (:meth:`_SijnodeCelery.warm_up`, on
``worker_process_init``) and keeps them for its life.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from sijnode.errors import SijnodeError
from sijnode.logs import fields
from sijnode.settings import Settings
from sijnode.workers.jobs import WorkerContext, execute_job
from sijnode.workers.messages import RUN_JOB_TASK, JobMessage

log = logging.getLogger(__name__)


class _SijnodeCelery(Celery):
    """Celery app that carries the node's settings and the worker's context."""

    sijnode_settings: Settings
    sijnode_context: WorkerContext | None = None
    sijnode_device: str | None = None

    def worker_context(self) -> WorkerContext:
        """The process's worker context, built on first use."""
        if self.sijnode_context is None:
            from sijnode.workers.context import make_worker_context

            self.sijnode_context = make_worker_context(
                self.sijnode_settings, device=self.sijnode_device
            )
        return self.sijnode_context

    def warm_up(self, pipelines: list[str]) -> None:
        """Load the models of ``pipelines`` now; a pipeline without a usable model is logged."""
        ctx = self.worker_context()
        warm_pipelines(ctx, pipelines)
        serve_metrics(ctx)


def serve_metrics(ctx: WorkerContext) -> None:
    """Serve the worker's metrics on ``metrics.worker_port`` (0: not served)."""
    port = ctx.settings.metrics.worker_port
    if not port:
        return
    try:
        ctx.metrics.serve(port, ctx.settings.metrics.bind_address)
    except OSError as exc:  # e.g. a second worker on this host: its jobs still run
        log.error(
            "worker metrics not served",
            extra=fields(port=port, error=f"cannot listen on port {port}: {exc.strerror}"),
        )


def warm_pipelines(ctx: WorkerContext, pipelines: list[str]) -> None:
    """Load each pipeline's models into ``ctx`` (once per process), and the report
    builders (highdicom, OpenCV), so the first job does not pay for their import."""
    from sijnode.workers.inference import warm
    from sijnode.workers.reporting import warm_reports

    warm_reports()
    for name in pipelines:
        try:
            identity = ctx.models(name)
            if identity is None:
                log.info("no model configured", extra=fields(pipeline=name))
                continue
            warm(ctx, identity)
        except SijnodeError as exc:
            log.error("models not loaded", extra=fields(pipeline=name, error=str(exc)))
        except Exception:  # a broken pipeline module must not stop the worker
            log.exception("models not loaded", extra=fields(pipeline=name))


def make_celery(settings: Settings) -> Celery:
    """Create the Celery app for ``settings.broker``."""
    app = _SijnodeCelery(
        "sijnode",
        broker=settings.broker.url,
        backend=settings.broker.result_backend or None,
        set_as_current=False,
    )
    app.sijnode_settings = settings
    visibility = settings.broker.visibility_timeout_seconds
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
        broker_transport_options={
            "visibility_timeout": visibility,
            # look for messages of dead workers every few seconds, not every 100 s
            "unacked_restore_interval": max(1.0, min(10.0, visibility / 4)),
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        enable_utc=True,
    )

    @app.task(name=RUN_JOB_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_job(task: Task, message: dict[str, Any]) -> str:
        job = JobMessage.model_validate(message)
        return execute_job(app.worker_context(), job.job_id).value

    return app
