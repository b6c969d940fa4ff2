"""``sijnode serve``: run the node until SIGTERM or Ctrl-C."""

from __future__ import annotations

import signal
import threading
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the ``sijnode`` app."""
    app.command("serve")(serve)


def serve(
    ctx: typer.Context,
    port: int | None = typer.Option(None, "--port", help="Override node.port."),
    ae_title: str | None = typer.Option(None, "--ae-title", help="Override node.ae_title."),
    bind_address: str | None = typer.Option(None, "--bind", help="Override node.bind_address."),
) -> None:
    """Receive studies over DICOM, assemble, route and dispatch them (runs jobs itself
    when broker.url is empty)."""
    from sijnode.cli import state
    from sijnode.daemon.node import Node
    from sijnode.db.migrate import prepare_embedded
    from sijnode.logs import configure_logging

    node_overrides: dict[str, Any] = {
        k: v
        for k, v in {"port": port, "ae_title": ae_title, "bind_address": bind_address}.items()
        if v is not None
    }
    settings = state(ctx).settings({"node": node_overrides} if node_overrides else None)
    configure_logging(settings.logging.level, settings.logging.json_format)
    prepare_embedded(settings.database.url)
    node = Node(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    try:
        stop.wait()
    finally:
        node.stop()
