"""Prometheus metrics of the receiving node (LANDSCAPE.md, lead 8).

One registry per node, passed in (no module-level collectors), served on
``metrics.port``.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class NodeMetrics:
    """The node's counters and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._server: WSGIServer | None = None
        r = self.registry
        self.instances = Counter(
            "sijnode_instances_received", "Instances received, by outcome", ["outcome"], registry=r
        )
        self.bytes = Counter("sijnode_bytes_received", "Bytes stored in the spool", registry=r)
        self.associations = Counter(
            "sijnode_associations", "Associations, by outcome", ["outcome"], registry=r
        )
        self.store_seconds = Histogram(
            "sijnode_cstore_handling_seconds",
            "Time to store and record one instance in the C-STORE handler",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.studies_completed = Counter(
            "sijnode_studies_completed",
            "Studies judged complete, by reason",
            ["reason"],
            registry=r,
        )
        self.jobs_dispatched = Counter(
            "sijnode_jobs_dispatched", "Jobs created and sent", registry=r
        )
        self.studies_receiving = Gauge(
            "sijnode_studies_receiving", "Studies still being received", registry=r
        )
        self.job_sends = Counter(
            "sijnode_job_sends",
            "Job messages handed to the queue by the reconciler, by outcome",
            ["outcome"],
            registry=r,
        )
        self.jobs_unsent = Gauge(
            "sijnode_jobs_unsent",
            "Queued jobs whose message the queue does not have (yet)",
            registry=r,
        )

        # spool retention (sijnode.daemon.retention)
        self.spool_bytes = Gauge(
            "sijnode_spool_bytes",
            "Bytes in the spool, by retention state (receiving, waiting, kept, eligible)",
            ["state"],
            registry=r,
        )
        self.spool_free_bytes = Gauge(
            "sijnode_spool_free_bytes", "Free bytes on the spool's filesystem", registry=r
        )
        self.spool_files_removed = Counter(
            "sijnode_spool_files_removed",
            "Spool and output files removed, by reason",
            ["reason"],
            registry=r,
        )
        self.spool_bytes_removed = Counter(
            "sijnode_spool_bytes_removed", "Bytes removed, by reason", ["reason"], registry=r
        )
        self.spool_pressure_unrelieved = Gauge(
            "sijnode_spool_pressure_unrelieved",
            "1 while free space is below storage.purge_below_free_mb and nothing is eligible",
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
