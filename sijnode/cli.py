"""The ``sijnode`` command line.

Each part of the node registers its own commands; this module only wires them and the
global ``--config`` option. Heavy imports happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from sijnode import __version__
from sijnode.errors import ConfigurationError, SijnodeError
from sijnode.settings import (
    Settings,
    flatten,
    load_settings,
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


class CliState:
    """What the global options carry to every subcommand."""

    def __init__(self, config_file: Path | None) -> None:
        self.config_file = config_file

    def settings(self, overrides: dict[str, Any] | None = None) -> Settings:
        """Load the settings with command-line ``overrides`` on top."""
        return load_settings(self.config_file, overrides)


def state(ctx: typer.Context) -> CliState:
    """Return the global CLI state of this invocation."""
    obj = ctx.find_root().obj
    if not isinstance(obj, CliState):
        obj = CliState(None)
        ctx.find_root().obj = obj
    return obj


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sijnode {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML settings file.", envvar="SIJNODE_CONFIG"
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = CliState(config)


class OutputFormat(StrEnum):
    """How ``config show`` prints."""

    table = "table"
    json = "json"


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    output_format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="Output."),
) -> None:
    """Print the effective settings and where each value came from."""
    settings, origins = settings_provenance(state(ctx).config_file)
    values = flatten(settings.model_dump(mode="json"))
    if output_format is OutputFormat.json:
        typer.echo(
            json.dumps({k: {"value": v, "source": origins[k]} for k, v in values.items()}, indent=2)
        )
        return
    width = max(len(k) for k in values)
    for key, value in values.items():
        typer.echo(f"{key:<{width}}  {json.dumps(value):<40}  [{origins[key]}]")


@config_app.command("check")
def config_check(
    ctx: typer.Context,
    file: Path | None = typer.Argument(None, help="Settings file (default: --config)."),
) -> None:
    """Validate the settings (file, then environment on top); exit 1 naming each bad key."""
    path = file or state(ctx).config_file
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
    from sijnode.daemon import cli as daemon_cli
    from sijnode.db import cli as db_cli
    from sijnode.delivery import cli as delivery_cli
    from sijnode.synth import cli as synth_cli
    from sijnode.workers import cli as workers_cli

    for part in (synth_cli, daemon_cli, workers_cli, db_cli, delivery_cli):
        part.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``sijnode`` command."""
    _register_parts()
    try:
        app(args=argv, prog_name="sijnode", standalone_mode=True)
    except SijnodeError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
