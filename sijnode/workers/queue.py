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

    from sijnode.settings import BrokerSettings


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

    #: True when a sent message can be lost outside this process (a broker that restarts
    #: without persistence), so a job still unclaimed long after its send is sent again.
    can_lose_messages: bool

    def send(self, message: JobMessage) -> str:
        """Queue ``message``; raise DispatchError when it could not be queued."""
        ...


def publisher_options(broker: BrokerSettings) -> dict[str, object]:
    """Celery settings of a process that only sends: one short try, never a long wait.

    Kombu otherwise retries a lost connection for ``broker_connection_timeout`` and the
    publish itself three more times; a dead broker then holds each send for seconds. A
    send that fails is recorded and left to the reconciler (``sijnode.daemon.reconcile``).
    """
    timeout = broker.connect_timeout_seconds
    return {
        "broker_connection_timeout": timeout,
        "broker_connection_retry": False,
        "broker_connection_max_retries": 0,
        "broker_pool_limit": 1,
        "broker_transport_options": {
            "max_retries": 0,
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
            "retry_on_timeout": False,
        },
        # a Redis result backend (broker.result_backend) is contacted by each send too
        "redis_socket_connect_timeout": timeout,
        "redis_socket_timeout": timeout,
        "redis_retry_on_timeout": False,
        "result_backend_transport_options": {"retry_policy": {"max_retries": 0}},
    }


class CeleryQueue:
    """Sends job messages to Celery workers through the broker, one short try each."""

    can_lose_messages = True

    def __init__(
        self, app: Celery, broker: BrokerSettings, settings: Settings | None = None
    ) -> None:
        self.app = app
        self.queue = broker.queue
        self.settings: Settings | None = settings or getattr(app, "sijnode_settings", None)
        app.conf.update(publisher_options(broker))

    def queue_for(self, pipeline: str) -> str:
        """The queue a job of ``pipeline`` is sent to (its pipeline's own queue)."""
        if self.settings is None:
            return self.queue
        return pipeline_queue(self.settings, pipeline)

    def send(self, message: JobMessage) -> str:
        """Send the run-job task with the message as its only argument (no retries)."""
        try:
            result = self.app.send_task(
                RUN_JOB_TASK,
                kwargs={"message": message.model_dump(mode="json")},
                queue=self.queue_for(message.pipeline),
                retry=False,
            )
        except Exception as exc:  # kombu and redis raise many types; all mean "not queued"
            raise DispatchError(
                f"broker did not accept job {message.job_id}: {type(exc).__name__}: {exc}"
            ) from exc
        return str(result.id)
