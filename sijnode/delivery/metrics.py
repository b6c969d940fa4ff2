"""Prometheus metrics of the deliver stage: attempts by kind and outcome, their duration."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class DeliveryMetrics:
    """Counters and histograms of deliveries; registered on the node's registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.registry = r
        self.attempts = Counter(
            "sijnode_delivery_attempts",
            "Delivery attempts, by kind (dicom, stow, webhook) and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.seconds = Histogram(
            "sijnode_delivery_seconds",
            "Duration of one delivery attempt (association, stores, N-ACTION or HTTP)",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.dead = Counter(
            "sijnode_deliveries_dead",
            "Deliveries moved to the dead-letter list",
            ["kind"],
            registry=r,
        )
        self.commitments = Counter(
            "sijnode_storage_commitment_reports",
            "Storage Commitment reports received, by result (committed, failed, unknown)",
            ["result"],
            registry=r,
        )
