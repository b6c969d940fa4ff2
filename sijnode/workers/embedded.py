"""The embedded worker: the same job code in a child process of ``sijnode serve``.

Used when ``broker.url`` is empty, so one process tree is a complete node (no Redis). A
feeder thread in the listener takes job messages in arrival order and hands each to a
child process (``multiprocessing`` spawn: torch is imported only there, and inference
and report building never hold the listener's GIL). The child loads the models once when
it starts and keeps them. A job whose pipeline has no usable model only needs its
``no_model`` bookkeeping, which the feeder does itself, so a node without models starts no
child, unless a job left ``inferred`` needs its report (built in the child too). The queue
lives in the audit database (queued jobs are sent again at start-up), and a job whose
child died is run once more in a fresh child, so nothing is lost when a process dies.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import uuid
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from typing import Any

from sqlalchemy import select

from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.schema import Job, JobState
from sijnode.errors import SijnodeError
from sijnode.logs import fields
from sijnode.workers.finish import fail_unfinished
from sijnode.workers.jobs import INFERENCE_DONE_STATES, WorkerContext, execute_job
from sijnode.workers.lease import release_all_leases, release_lease
from sijnode.workers.messages import JobMessage

log = logging.getLogger(__name__)

#: Runs of one job in a fresh child after its child died, before the job fails.
CHILD_DEATHS_ALLOWED = 2
_POLL_SECONDS = 0.5


def _child_main(settings_json: str, device: str | None, jobs: Any, done: Any) -> None:
    """Body of the child process: build a worker context, load the models, run jobs."""
    from sijnode.logs import configure_logging
    from sijnode.settings import Settings
    from sijnode.workers.celery_app import serve_metrics, warm_pipelines
    from sijnode.workers.context import make_worker_context

    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.logging.level, settings.logging.json_format)
    ctx = make_worker_context(settings, device=device)
    warm_pipelines(ctx, list(settings.pipelines))  # once, before the first job
    serve_metrics(ctx)
    done.put(("ready", None, None))
    while True:
        job_id = jobs.get()
        if job_id is None:
            return
        state, error = run_one(ctx, job_id)
        done.put((job_id, state, error))


def run_one(ctx: WorkerContext, job_id: int) -> tuple[str, str | None]:
    """Run one job in this process: its final state, or ``("error", reason)`` when
    :func:`execute_job` raised (the process outlives a broken job)."""
    try:
        return execute_job(ctx, job_id).value, None
    except SijnodeError as exc:
        log.error("embedded job failed", extra=fields(job_id=job_id, error=str(exc)))
        return "error", str(exc)
    except Exception as exc:
        log.exception("embedded job raised", extra=fields(job_id=job_id))
        return "error", f"{type(exc).__name__}: {exc}"


class _Child:
    """One child process and its two queues."""

    def __init__(self, settings_json: str, device: str | None) -> None:
        context = mp.get_context("spawn")
        self.jobs: Any = context.Queue()
        self.done: Any = context.Queue()
        self.process: SpawnProcess = context.Process(
            target=_child_main,
            args=(settings_json, device, self.jobs, self.done),
            name="sijnode-embedded-child",
            daemon=True,
        )
        self.process.start()

    def run(self, job_id: int) -> tuple[str, str | None] | None:
        """Run one job; its final state and error (:func:`run_one`), or None when the
        child died first."""
        self.jobs.put(job_id)
        while True:
            try:
                key, state, error = self.done.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self.process.is_alive():
                    return None
                continue
            if key == job_id:
                return str(state), error

    def stop(self, timeout: float) -> None:
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.jobs.close()
        self.done.close()


class EmbeddedWorker:
    """A JobQueue whose messages run in a child process, one at a time, in order."""

    #: Messages live in this process's memory: only a crash loses them, and start-up
    #: recovery sends every queued job again.
    can_lose_messages = False

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._queue: queue.Queue[JobMessage | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sijnode-embedded-worker")
        self._child: _Child | None = None
        self._child_lock = threading.Lock()
        #: Called with the job id after each job (the node wakes its delivery loop).
        self.on_done: Callable[[int], None] | None = None

    @property
    def child_pid(self) -> int | None:
        """Process id of the running child, if any (tests, metrics)."""
        child = self._child
        return child.process.pid if child is not None and child.process.is_alive() else None

    def start(self) -> None:
        """Start the feeder thread; start the child now if any pipeline has a model.

        Leases left by an earlier process are cleared first: in embedded mode this
        process is the only one that runs jobs, so no earlier run lives on.
        """
        cleared = release_all_leases(self.ctx.sessions)
        if cleared:
            log.info("job leases of an earlier process cleared", extra=fields(jobs=cleared))
        if any(self.ctx.models.usable(name) for name in self.ctx.settings.pipelines):
            self._ensure_child()
        self._thread.start()

    def send(self, message: JobMessage) -> str:
        """Queue ``message`` for the worker."""
        self._queue.put(message)
        return f"embedded-{uuid.uuid4().hex[:12]}"

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand and stop the thread and the child."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        with self._child_lock:
            if self._child is not None:
                self._child.stop(timeout)
                self._child = None

    def _needs_report(self, job_id: int) -> bool:
        """Whether the job is ``inferred``: its report (highdicom, OpenCV, the captures)
        is built in the child even when its model is gone, never in the listener."""
        with self.ctx.sessions() as session:
            state = session.scalar(select(Job.state).where(Job.id == job_id))
        return state is JobState.INFERRED

    def _ensure_child(self) -> _Child:
        with self._child_lock:
            if self._child is None or not self._child.process.is_alive():
                self._child = _Child(self.ctx.settings.model_dump_json(), self.ctx.device)
                log.info(
                    "embedded worker process started", extra=fields(pid=self._child.process.pid)
                )
            return self._child

    def _run_in_child(self, job_id: int) -> tuple[str, str | None]:
        for attempt in range(1, CHILD_DEATHS_ALLOWED + 1):
            child = self._ensure_child()
            answer = child.run(job_id)
            if answer is not None:
                return answer
            code = child.process.exitcode
            log.error(
                "embedded worker process died during a job",
                extra=fields(job_id=job_id, exit_code=code, attempt=attempt),
            )
            # the dead child holds the job's lease no more: the next child runs it at once
            release_lease(self.ctx.sessions, job_id)
        with transaction(self.ctx.sessions) as session:
            job = session.get_one(Job, job_id)
            if job.state not in INFERENCE_DONE_STATES:
                transition(
                    session,
                    job,
                    JobState.FAILED,
                    f"the embedded worker process died {CHILD_DEATHS_ALLOWED} times running "
                    f"this job (last exit code {code})",
                )
        return JobState.FAILED.value, None

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            self._handle(message)

    def _handle(self, message: JobMessage) -> None:
        """Run one message; whatever it raises, the feeder goes on to the next one.

        A job whose run ended in an error (``execute_job`` raised, in the child or here)
        is failed with the reason, so it is never left ``running`` or ``inferred``.
        """
        job_id = message.job_id
        try:
            if self.ctx.models.usable(message.pipeline) or self._needs_report(job_id):
                state, error = self._run_in_child(job_id)
            else:  # only no_model bookkeeping: no inference, no report, no child
                state, error = run_one(self.ctx, job_id)
            if state == "error":
                fail_unfinished(self.ctx.sessions, job_id, f"embedded worker: {error}")
        except Exception:  # the feeder outlives a broken job and a broken audit
            log.exception("embedded job could not be settled", extra=fields(job_id=job_id))
        finally:
            try:
                if self.on_done is not None:
                    self.on_done(job_id)
            except Exception:  # a failing callback must not stop the feeder either
                log.exception("embedded worker: on_done raised", extra=fields(job_id=job_id))
