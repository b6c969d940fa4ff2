"""``sijnode serve``: run the node until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sijnode.settings import SettingsLoader


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``serve`` to the ``sijnode`` app; ``settings`` loads this invocation's settings."""

    @app.command("serve")
    def serve(
        port: int | None = typer.Option(None, "--port", help="Override node.port."),
        ae_title: str | None = typer.Option(None, "--ae-title", help="Override node.ae_title."),
        bind_address: str | None = typer.Option(None, "--bind", help="Override node.bind_address."),
    ) -> None:
        """Receive studies over DICOM, assemble, route and dispatch them (runs jobs itself
        when broker.url is empty)."""
        from sijnode.daemon.node import Node
        from sijnode.db.migrate import prepare_embedded
        from sijnode.logs import configure_logging, fields

        log = logging.getLogger("sijnode.daemon.serve")
        node_overrides: dict[str, Any] = {
            k: v
            for k, v in {"port": port, "ae_title": ae_title, "bind_address": bind_address}.items()
            if v is not None
        }
        loaded = settings({"node": node_overrides} if node_overrides else None)
        configure_logging(loaded.logging.level, loaded.logging.json_format)
        prepare_embedded(loaded.database.url)  # a new SQLite audit needs no set-up step
        node = Node(loaded)
        stop = threading.Event()
        received: list[str] = []

        def on_signal(signum: int, _frame: object) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        node.start()
        try:
            stop.wait()
        finally:
            # Stop accepting, answer the instances in flight, then exit 0 (docs/deployment.md).
            log.info("stopping", extra=fields(signal=received[0] if received else None))
            node.stop()
            log.info("stopped")
