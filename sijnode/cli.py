"""The ``sijnode`` command line.

The root owns the global options (``--config``, ``--version``) and the ``config`` commands;
every other command belongs to a part of the node, which adds it when the root registers
the part. Heavy imports happen inside the commands, so ``--help`` is fast.

How a part adds commands (``serve``, ``worker``, ``synth``, ``db``, ``audit`` do it; the
coming ``models``, ``deliveries``, ``train`` and ``spool`` do the same):

1. The part has a ``cli.py`` with ``register(app: typer.Typer, settings: SettingsLoader)``.
   It adds its commands to ``app``: one command with ``app.command("name")``, a group with
   ``app.add_typer(group, name="name")`` on a ``typer.Typer`` it builds inside ``register``.
2. What a command needs comes in through ``register``'s arguments, never from this module:
   a part's ``cli.py`` does not import :mod:`sijnode.cli`, so there is no import circle and
   a part can be tested on a bare ``typer.Typer()``. ``settings`` is a
   :class:`~sijnode.settings.SettingsLoader`: call ``settings()`` inside the command (not in
   ``register``) to get the validated settings of this invocation, with the root's
   ``--config`` applied; ``settings({"node": {"port": 11113}})`` puts command-line
   overrides on top.
3. The commands close over ``settings``: define them inside ``register`` (one or two
   commands, as in ``daemon/cli.py``), or as methods of a small class that ``register``
   builds with ``settings`` and whose bound methods it adds (many commands sharing helpers,
   as ``AuditCommands`` in ``audit/cli.py``), or on a module-level group added with
   :func:`sijnode.cli_context.add_group`, whose commands read the settings with
   ``group_settings(ctx)`` (``models/cli.py``, ``delivery/cli.py``);
   :func:`sijnode.cli_context.audit_session` is the audit transaction they share.
4. The part's module imports only ``typer`` and light modules at the top; SQLAlchemy, torch,
   numpy and the like are imported inside the command bodies.
5. Add the part to :func:`_register_parts` below, and list the command in the README.

For example (a group with one command; the names are made up)::

    if TYPE_CHECKING:
        from sijnode.settings import SettingsLoader

    def register(app: typer.Typer, settings: SettingsLoader) -> None:
        # Add `sijnode spool` to the `sijnode` app.
        spool = typer.Typer(help="The spool of received instances.", no_args_is_help=True)
        app.add_typer(spool, name="spool")

        @spool.command("usage")
        def usage() -> None:
            # The docstring here is the command's help: "Print the spool's free space."
            import shutil

            spool_dir = settings().storage.spool_dir
            typer.echo(f"{spool_dir}: {shutil.disk_usage(spool_dir).free} bytes free")

A test registers the part on a bare app with its own loader, e.g.
``register(app, functools.partial(load_settings, None))`` or a function that returns
prepared settings (``tests/test_cli.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from sijnode import __version__
from sijnode.errors import ConfigurationError, SijnodeError
from sijnode.settings import (
    MASK,
    Settings,
    load_settings,
    masked_values,
    settings_provenance,
    unknown_env_vars,
)

app = typer.Typer(
    name="sijnode",
    help="DICOM node that triages sacroiliitis with AI (research use only).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


class Invocation:
    """The root options of the running ``sijnode`` invocation. The root callback sets
    them before any command runs; parts see them only through the loader that
    :func:`_register_parts` hands them."""

    def __init__(self) -> None:
        self.config_file: Path | None = None

    def settings(self, overrides: Mapping[str, Any] | None = None) -> Settings:
        """The :class:`~sijnode.settings.SettingsLoader` passed to every part: the settings
        of this invocation (its ``--config`` file, the environment, then ``overrides``
        from the command line on top)."""
        return load_settings(self.config_file, overrides)


invocation = Invocation()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sijnode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML settings file.", envvar="SIJNODE_CONFIG"
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    invocation.config_file = config


class OutputFormat(StrEnum):
    """How ``config show`` prints."""

    table = "table"
    json = "json"


@config_app.command("show")
def config_show(
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output."),
) -> None:
    """Print the effective settings and where each value came from (secrets masked)."""
    settings, origins = settings_provenance(invocation.config_file)
    values, masked = masked_values(settings)
    if output_format is OutputFormat.json:
        shown: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            shown[key] = {"value": value, "source": origins[key]}
            if key in masked:
                shown[key]["masked"] = True
        typer.echo(json.dumps(shown, indent=2))
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        source = f"{origins[key]}, masked" if key in masked else origins[key]
        typer.echo(f"{key:<{width}}  {json.dumps(value):<40}  [{source}]")
    typer.echo(
        f"Secrets are shown as {MASK}: passwords in URLs and the settings marked secret "
        "(docs/configuration.md); the node uses the real values."
    )


@config_app.command("check")
def config_check(
    file: Path | None = typer.Argument(None, help="Settings file (default: --config)."),
) -> None:
    """Validate the settings (file, then environment on top); exit 1 naming each bad key."""
    path = file or invocation.config_file
    load_settings(path)
    unknown = unknown_env_vars()
    if unknown:
        raise ConfigurationError(
            "invalid settings:\n"
            + "\n".join(
                f"  {name} (environment): expected the name of a setting" for name in unknown
            )
        )
    typer.echo(f"ok: {path or 'defaults'} is valid")


def _register_parts() -> None:
    """Let each part add its commands (each import is light: no torch at import)."""
    from sijnode.audit import cli as audit_cli
    from sijnode.daemon import cli as daemon_cli
    from sijnode.daemon import spool_cli
    from sijnode.db import cli as db_cli
    from sijnode.delivery import cli as delivery_cli
    from sijnode.models import cli as models_cli
    from sijnode.synth import cli as synth_cli
    from sijnode.training import cli as training_cli
    from sijnode.workers import cli as workers_cli

    parts = (
        synth_cli,
        daemon_cli,
        workers_cli,
        db_cli,
        audit_cli,
        models_cli,
        delivery_cli,
        spool_cli,
        training_cli,
    )
    for part in parts:
        part.register(app, invocation.settings)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sijnode`` command."""
    _register_parts()
    try:
        app(args=argv, prog_name="sijnode", standalone_mode=True)
    except SijnodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
