"""Alembic environment of the audit schema.

Run through :mod:`sijnode.db.migrate`, never with an ``alembic.ini``: the caller puts an
open connection (or a URL, for ``--sql`` output) into ``config.attributes``. SQLite runs
in batch mode (``render_as_batch``) so later ``ALTER`` steps work there too. On
PostgreSQL the tables and ``alembic_version`` go to the connection's ``search_path``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from sijnode.db.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else (url or "").split(":")[0]
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=dialect.startswith("sqlite"),
        compare_type=True,
        compare_server_default=True,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout for ``config.attributes['url']`` (``sijnode db upgrade --sql``)."""
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("expected a database URL in config.attributes['url'], got none")
    _configure(url=str(url))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run on the open connection in ``config.attributes['connection']``."""
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "expected an open connection in config.attributes['connection'], got none; "
            "run migrations through sijnode.db.migrate"
        )
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
