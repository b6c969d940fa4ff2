"""The embedded worker: the same job code in a thread of ``sijnode serve``.

Used when ``broker.url`` is empty, so one process is a complete node (no Redis). Jobs run
one at a time in arrival order; the queue lives in the audit database (queued and
interrupted jobs are sent again at start-up), so nothing is lost when the process dies.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid

from sijnode.errors import SijnodeError
from sijnode.logs import fields
from sijnode.workers.jobs import WorkerContext, execute_job
from sijnode.workers.messages import JobMessage

log = logging.getLogger(__name__)


class EmbeddedWorker:
    """A JobQueue whose messages are run by a background thread."""

    #: Messages live in this process's memory: only a crash loses them, and start-up
    #: recovery sends every queued job again.
    can_lose_messages = False

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[JobMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sijnode-embedded-worker")
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def send(self, message: JobMessage) -> str:
        """Queue ``message`` for the worker thread."""
        self._idle.clear()
        self._queue.put(message)
        return f"embedded-{uuid.uuid4().hex[:12]}"

    def wait_idle(self, timeout: float) -> bool:
        """Block until every queued job has run (tests, shutdown)."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand and stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                execute_job(self.ctx, message.job_id)
            except SijnodeError as exc:
                log.error(
                    "embedded job failed", extra=fields(job_id=message.job_id, error=str(exc))
                )
            except Exception:  # the worker thread outlives a broken job
                log.exception("embedded job raised", extra=fields(job_id=message.job_id))
            finally:
                if self._queue.empty():
                    self._idle.set()
