"""Run a real node in the test process and talk to it with real DICOM peers.

Receive tests run in both receive modes (``node.receive_mode``): a test module that
imports :func:`receive_mode` and marks itself ``pytest.mark.usefixtures("receive_mode")``
runs each test once per mode, and :func:`node_settings` picks the mode up.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import func, select

from sijnode.daemon.node import Node
from sijnode.db.migrate import upgrade
from sijnode.settings import Settings, load_settings
from tests.conftest import free_port


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


RECEIVE_MODES = ("fast", "standard")
_receive_mode: ContextVar[str] = ContextVar("receive_mode", default="fast")


@pytest.fixture(params=RECEIVE_MODES)
def receive_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each receive mode in turn; :func:`node_settings` uses it meanwhile."""
    token = _receive_mode.set(str(request.param))
    try:
        yield str(request.param)
    finally:
        _receive_mode.reset(token)


def current_receive_mode() -> str:
    """The receive mode of the running test (``fast`` outside :func:`receive_mode`)."""
    return _receive_mode.get()


def node_settings(tmp_path: Path, db_url: str | None = None, **overrides: Any) -> Settings:
    """Settings for a node on a free loopback port with fast completion timers."""
    url = db_url or f"sqlite:///{tmp_path / 'audit.db'}"
    base: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": url, "pseudonym_secret": "test-secret"},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
        "node": {
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "receive_mode": current_receive_mode(),
        },
        "metrics": {"port": 0},
        "completion": {
            "quiet_seconds": 1.5,
            "content_quiet_seconds": 0.5,
            "check_interval_seconds": 0.2,
        },
        "logging": {"json_format": True},
    }
    return load_settings(overrides=deep_merge(base, overrides))


@contextmanager
def running_node(settings: Settings, migrate: bool = True) -> Iterator[Node]:
    """A started node; stopped afterwards."""
    if migrate:
        upgrade(settings.database.url)
    node = Node(settings)
    node.start()
    assert node.scp.mode == settings.node.receive_mode, "the receive mode asked for is in effect"
    try:
        yield node
    finally:
        node.stop()


def send(
    datasets: list[Dataset],
    port: int,
    calling_ae: str = "TESTSCU",
    ssl_context: ssl.SSLContext | None = None,
) -> list[int]:
    """Send datasets on one association with pynetdicom; return the status of each."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts[:100]
    tls_args = (ssl_context, "127.0.0.1") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE", tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError(f"association not established (rejected={assoc.is_rejected})")
    statuses = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    assert value, f"condition not met within {timeout} s (last value {value!r})"
    return value


def count(node: Node, model: Any, *where: Any) -> int:
    """Rows of ``model`` in the node's audit database."""
    with node.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)
