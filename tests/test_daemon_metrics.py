"""Prometheus metrics of the listener, read over HTTP as a scraper would."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sijnode.daemon.scp import OUT_OF_RESOURCES, SUCCESS
from tests.conftest import free_port
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import make_study


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_metrics_count_instances_associations_and_completion(tmp_path: Path) -> None:
    port = free_port()
    settings = node_settings(
        tmp_path, metrics={"port": port}, node={"max_instances_per_association": 3}
    )
    with running_node(settings) as node:
        statuses = send(make_study("metrics", n=4), node.scp.port)
        assert statuses == [SUCCESS] * 3 + [OUT_OF_RESOURCES]
        wait_for(lambda: _scrape(port).get("sijnode_jobs_dispatched_total{}") == 1.0)
        m = _scrape(port)
    assert m["sijnode_instances_received_total{outcome=stored}"] == 3
    assert m["sijnode_instances_received_total{outcome=refused}"] == 1
    assert m["sijnode_associations_total{outcome=accepted}"] == 1
    assert m["sijnode_cstore_handling_seconds_count{}"] == 4
    assert m["sijnode_bytes_received_total{}"] > 3 * 32 * 32 * 2
    # 3 of the 4 announced slices arrived: complete by the quiet timer, gaps recorded
    completed = {k: v for k, v in m.items() if k.startswith("sijnode_studies_completed_total")}
    assert completed == {"sijnode_studies_completed_total{reason=quiet_timer_with_gaps}": 1.0}


def test_busy_port_stops_the_node_cleanly(tmp_path: Path) -> None:
    import socket

    import pytest

    from sijnode.daemon.node import Node
    from sijnode.db.migrate import upgrade
    from sijnode.errors import ConfigurationError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        settings = node_settings(tmp_path, metrics={"port": taken})
        upgrade(settings.database.url)
        node = Node(settings)
        with pytest.raises(ConfigurationError, match=rf"metrics.port: cannot listen on .*:{taken}"):
            node.start()
        # nothing half-started: the DICOM port is free and no worker thread runs
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", settings.node.port))
        assert node.embedded is not None and not node.embedded._thread.is_alive()
        # and the DICOM port taken gives the same kind of error
        other = node_settings(tmp_path / "b", node={"port": taken})
        upgrade(other.database.url)
        with pytest.raises(ConfigurationError, match=rf"node.port: cannot listen on .*:{taken}"):
            Node(other).start()
