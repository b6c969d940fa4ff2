"""What the parts' command groups share: the settings loader in a group's context, and a
transaction on the audit database after the schema check.

A group registered with :func:`add_group` carries the root's
:class:`~sijnode.settings.SettingsLoader` in its Typer context; a command of the group
gets this invocation's settings with :func:`group_settings`. Light at import: SQLAlchemy
is imported inside :func:`audit_session`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from sijnode.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sijnode.settings import Settings, SettingsLoader


class SettingsCarrier:
    """The settings loader the root passes in, carried by a group's context."""

    def __init__(self, settings: SettingsLoader) -> None:
        self.settings = settings


def add_group(app: typer.Typer, group: typer.Typer, name: str, settings: SettingsLoader) -> None:
    """Add ``group`` to ``app`` as ``name``, its commands' context carrying ``settings``."""
    app.add_typer(group, name=name, context_settings={"obj": SettingsCarrier(settings)})


def group_settings(ctx: typer.Context) -> Settings:
    """This invocation's settings, from the loader of the command's group (:func:`add_group`)."""
    carrier = ctx.find_object(SettingsCarrier)
    if carrier is None:
        raise ConfigurationError(
            f"sijnode {ctx.command_path}: no settings loader in the command's context "
            "(register the group with sijnode.cli_context.add_group)"
        )
    return carrier.settings()


@contextmanager
def audit_session(settings: Settings) -> Iterator[Session]:
    """A transaction on the audit database, after the schema check; the engine is
    disposed of at the end."""
    from sijnode.db.engine import make_engine, make_sessionmaker, transaction
    from sijnode.db.migrate import check_schema_current

    engine = make_engine(settings.database.url, echo=settings.database.echo)
    try:
        check_schema_current(engine)
        with transaction(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()
