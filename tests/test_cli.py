"""The ``sijnode`` command tree: version, help everywhere, no placeholder commands.

The tree is walked from the real app after every part has registered, so a command added
later is covered without touching this file.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import sijnode
from sijnode import cli

SIJNODE = Path(sys.executable).with_name("sijnode")

#: Help texts that mean "not written yet".
PLACEHOLDERS = re.compile(r"^\s*(todo|tbd|fixme|xxx|placeholder|not implemented|\.\.\.)\b", re.I)


def root_command() -> Any:
    """The click command behind ``sijnode``, with every part's commands registered."""
    cli._register_parts()
    return typer.main.get_command(cli.app)


def command_tree() -> dict[tuple[str, ...], Any]:
    """Every command and group by its path below ``sijnode``: ``()`` is the root."""
    tree: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        tree[path] = command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(root_command(), ())
    return tree


def is_group(command: Any) -> bool:
    return bool(getattr(command, "commands", None))


TREE = command_tree()
PATHS = sorted(TREE)


def _id(path: tuple[str, ...]) -> str:
    return " ".join(("sijnode", *path))


def test_version_in_process() -> None:
    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"sijnode {sijnode.__version__}"


def test_version_of_the_installed_command() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")}
    result = subprocess.run(
        [str(SIJNODE), "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sijnode {sijnode.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", sijnode.__version__)


def test_tree_has_the_known_commands() -> None:
    assert {("config",), ("config", "show"), ("config", "check")} <= set(TREE)
    assert is_group(TREE[()]) and is_group(TREE[("config",)])


@pytest.mark.parametrize("path", PATHS, ids=[_id(p) for p in PATHS])
def test_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli.app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    usage = re.search(r"Usage: (\S+(?: [a-z][\w-]*)*)", result.output)
    assert usage is not None, result.output
    assert usage.group(1) == " ".join(("sijnode", *path)), result.output
    for name in getattr(TREE[path], "commands", {}):
        assert name in result.output, f"{name} is not listed in the help of {_id(path)}"


@pytest.mark.parametrize("path", PATHS, ids=[_id(p) for p in PATHS])
def test_no_placeholder_commands(path: tuple[str, ...]) -> None:
    command = TREE[path]
    text = (command.help or command.short_help or "").strip()
    assert text, f"`{_id(path)}` has no help text"
    assert not PLACEHOLDERS.match(text), f"`{_id(path)}` has a placeholder help: {text!r}"
    if path and not is_group(command):
        assert command.callback is not None, f"`{_id(path)}` does nothing"
    if is_group(command):
        assert command.commands, f"group `{_id(path)}` has no commands"
    for param in command.params:
        if param.param_type_name == "option" and param.name != "help":
            assert (param.help or "").strip(), f"{_id(path)} {param.opts[0]} has no help text"


def test_help_of_the_installed_command() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")}
    result = subprocess.run(
        [str(SIJNODE), "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for name in TREE[()].commands:
        assert name in result.stdout


def test_unknown_command_fails() -> None:
    result = CliRunner().invoke(cli.app, ["no-such-command"])
    assert result.exit_code == 2


def test_parts_do_not_import_the_root() -> None:
    """Each part gets what it needs from ``register(app, settings)``: no import circle."""
    package = Path(sijnode.__file__).parent
    parts = sorted(p for p in package.rglob("cli.py") if p != package / "cli.py")
    assert {p.parent.name for p in parts} >= {"audit", "daemon", "db", "synth", "workers"}
    for path in parts:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            else:
                continue
            assert "sijnode.cli" not in names, f"{path} imports sijnode.cli"
        register = inspect.signature(importlib.import_module(_module(path)).register)
        assert list(register.parameters) == ["app", "settings"], path


def _module(path: Path) -> str:
    package = Path(sijnode.__file__).parent
    return ".".join(("sijnode", *path.relative_to(package).with_suffix("").parts))


def test_a_part_runs_on_the_settings_it_is_given(tmp_path: Path) -> None:
    """A part registered on a bare app reads the settings from the loader it was given."""
    from sijnode.db import cli as db_cli
    from sijnode.settings import Settings, load_settings

    url = f"sqlite:///{tmp_path}/given.db"
    calls: list[object] = []

    def settings(overrides: object = None) -> Settings:
        calls.append(overrides)
        return load_settings(None, {"database": {"url": url}})

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    db_cli.register(app, settings)
    assert calls == []  # nothing is loaded at registration
    result = CliRunner().invoke(app, ["db", "current"], env={"SIJNODE_DATABASE__URL": "x://"})
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{url}: revision none (empty)")
    assert calls == [None]


def test_config_option_reaches_every_part(tmp_path: Path) -> None:
    """The root's --config is applied by the loader that the parts call."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/from-file.db"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")}
    result = subprocess.run(
        [str(SIJNODE), "--config", str(cfg), "db", "current"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"sqlite:///{tmp_path}/from-file.db: revision none")


def test_a_group_carries_the_settings_loader_to_its_commands(tmp_path: Path) -> None:
    """``cli_context.add_group``: the commands of a part's group get this invocation's
    settings; a group added without the loader says so (ConfigurationError)."""
    from sijnode.cli_context import add_group, group_settings
    from sijnode.errors import ConfigurationError
    from sijnode.settings import load_settings

    seen: list[str] = []

    def make(app: typer.Typer, with_loader: bool) -> None:
        group = typer.Typer()

        @group.command("site")
        def site(ctx: typer.Context) -> None:
            seen.append(group_settings(ctx).node.site)

        @group.command("other")
        def other() -> None:
            """A second command, so the group keeps its name."""

        if with_loader:
            add_group(
                app, group, "part", lambda *a: load_settings(overrides={"node": {"site": "x"}})
            )
        else:
            app.add_typer(group, name="part")

    for with_loader in (True, False):
        app = typer.Typer()
        make(app, with_loader)
        result = CliRunner().invoke(app, ["part", "site"])
        if with_loader:
            assert result.exit_code == 0, result.output
            assert seen == ["x"]
        else:
            assert isinstance(result.exception, ConfigurationError)
            assert "no settings loader" in str(result.exception)
