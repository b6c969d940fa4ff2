"""Prometheus metrics of a worker process (``sijnode worker``, the embedded child).

One registry per worker context (no module-level collectors), served on
``metrics.worker_port`` when it is not 0. Every stage of a job is a histogram: decode,
preprocess, localise, infer, explain, record (the pipeline's own stage clock).
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    """The worker's counters and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._server: WSGIServer | None = None
        r = self.registry
        self.jobs = Counter(
            "sijnode_worker_jobs",
            "Jobs run by this worker, by pipeline and the state they ended in",
            ["pipeline", "state"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "sijnode_worker_job_seconds",
            "Time from a job's start to its final state in this worker",
            ["pipeline"],
            buckets=_SECONDS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "sijnode_worker_stage_seconds",
            "Seconds of each stage of a job (decode, preprocess, localise, infer, explain)",
            ["pipeline", "stage"],
            buckets=_SECONDS,
            registry=r,
        )
        self.predictions = Counter(
            "sijnode_worker_predictions",
            "Recorded results, by pipeline and decision",
            ["pipeline", "decision"],
            registry=r,
        )
        self.model_load_seconds = Histogram(
            "sijnode_worker_model_load_seconds",
            "Time to load a pipeline's models (once per worker process)",
            ["pipeline"],
            buckets=_SECONDS,
            registry=r,
        )

    def serve(self, port: int, address: str) -> None:
        """Start the HTTP endpoint in a daemon thread."""
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        """Stop the HTTP endpoint, if it runs."""
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None
