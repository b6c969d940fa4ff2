"""Queues: one per pipeline plus the job queue; what a worker reads and which models it loads;
the Celery settings that make a worker's death harmless."""

from __future__ import annotations

from sijnode.settings import load_settings
from sijnode.workers.celery_app import make_celery
from sijnode.workers.queue import CeleryQueue, pipeline_queue, queue_pipelines, worker_queues


def test_a_queue_per_pipeline_and_the_job_queue() -> None:
    settings = load_settings(overrides={"pipelines": {"mr": {"queue": "gpu.mr"}}})
    assert pipeline_queue(settings, "ct") == "sijnode.ct"
    assert pipeline_queue(settings, "mr") == "gpu.mr"
    assert pipeline_queue(settings, "other") == "sijnode.jobs"
    assert worker_queues(settings) == ["sijnode.ct", "gpu.mr", "sijnode.jobs"]
    assert worker_queues(settings, "ct") == ["sijnode.ct"]
    assert worker_queues(settings, "ct, mr,sijnode.jobs") == [
        "sijnode.ct",
        "gpu.mr",
        "sijnode.jobs",
    ]
    assert queue_pipelines(settings, ["sijnode.ct", "sijnode.jobs"]) == ["ct"]
    assert queue_pipelines(settings, worker_queues(settings, "mr")) == ["mr"]


def test_celery_acks_late_prefetch_one_and_visibility_timeout() -> None:
    settings = load_settings(
        overrides={"broker": {"url": "redis://127.0.0.1:1/0", "visibility_timeout_seconds": 900}}
    )
    app = make_celery(settings)
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 900
    queue = CeleryQueue(app, settings.broker)
    assert queue.queue_for("ct") == "sijnode.ct" and queue.queue_for("x") == "sijnode.jobs"
