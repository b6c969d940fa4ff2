"""Schema migrations, driven from code: no ``alembic.ini`` is needed at run time.

The migration scripts live in the package (``sijnode/db/migrations``). ``sijnode db
upgrade`` calls :func:`upgrade`; every process that opens the audit database calls
:func:`check_schema_current` at start-up and refuses to run on an old schema.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from sijnode.db.engine import make_engine
from sijnode.errors import AuditError, SchemaOutOfDateError

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")


def alembic_config(**attributes: Any) -> Config:
    """An Alembic config for the packaged scripts; ``attributes`` reach ``env.py``."""
    cfg = Config(output_buffer=io.StringIO())
    # ConfigParser interpolates '%': escape it in the path.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.attributes.update(attributes)
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this version of sijnode."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise AuditError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def _known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


@contextmanager
def _engine_for(target: str | Engine) -> Iterator[Engine]:
    if isinstance(target, Engine):
        yield target
        return
    engine = make_engine(target)
    try:
        yield engine
    finally:
        engine.dispose()


def current_revision(bind: Engine | Connection) -> str | None:
    """The revision the database is at; None for an empty (never migrated) database."""
    if isinstance(bind, Connection):
        return MigrationContext.configure(bind).get_current_revision()
    with bind.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for the migration scripts.

    SQLite rebuilds a table to change its constraints (batch mode): the old table is
    dropped while other tables' rows still reference it, which foreign key enforcement
    refuses. So enforcement is off for the migration (it can only change outside a
    transaction), the result is checked with ``PRAGMA foreign_key_check`` before the
    commit, and enforcement is on again before the connection goes back to the pool.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()  # ends SQLAlchemy's autobegun transaction; SQLite had none
        try:
            with conn.begin():
                yield conn
                if sqlite:
                    dangling = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if dangling:
                        raise AuditError(
                            f"migration left {len(dangling)} rows whose foreign key points "
                            f"at no row (first: table {dangling[0][0]}); nothing was changed"
                        )
        finally:
            if sqlite:
                conn.rollback()  # a failed migration's transaction, if any, ends first
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def upgrade(url: str | Engine, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` (or an engine) to ``revision``; return the new one."""
    with _engine_for(url) as engine:
        with _migrating(engine) as conn:
            command.upgrade(alembic_config(connection=conn), revision)
        return current_revision(engine)


def downgrade(url: str | Engine, revision: str) -> str | None:
    """Migrate the database down to ``revision`` (``base`` drops everything)."""
    with _engine_for(url) as engine:
        with _migrating(engine) as conn:
            command.downgrade(alembic_config(connection=conn), revision)
        return current_revision(engine)


def upgrade_sql(url: str, revision: str = "head", start: str | None = None) -> str:
    """The SQL that :func:`upgrade` would run, for a DBA to review (offline mode)."""
    cfg = alembic_config(url=url)
    command.upgrade(cfg, f"{start}:{revision}" if start else revision, sql=True)
    buffer = cfg.output_buffer
    assert isinstance(buffer, io.StringIO)
    return buffer.getvalue()


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against the migrations of this version."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        """The database is at the head revision."""
        return self.current == self.head


def schema_status(engine: Engine) -> SchemaStatus:
    """Current and head revision of the database behind ``engine``."""
    return SchemaStatus(current=current_revision(engine), head=head_revision())


def check_schema_current(engine: Engine) -> str:
    """Return the head revision, or raise :class:`SchemaOutOfDateError` if not at it."""
    status = schema_status(engine)
    if status.up_to_date:
        return status.head
    where = engine.url.render_as_string(hide_password=True)
    if status.current is None:
        found = "an empty database (no migrations applied)"
    elif status.current not in _known_revisions():
        raise SchemaOutOfDateError(
            f"audit database {where} is at revision {status.current}, which this version of "
            f"sijnode does not know (expected {status.head}); it was migrated by a newer "
            f"sijnode: upgrade sijnode"
        )
    else:
        found = f"revision {status.current}"
    raise SchemaOutOfDateError(
        f"audit database {where} is not at the current schema: expected revision "
        f"{status.head}, found {found}; run `sijnode db upgrade`"
    )


def prepare_embedded(url: str) -> str | None:
    """Create and migrate an empty embedded SQLite audit; return the revision it reached.

    ``sijnode serve`` on the SQLite default needs no set-up step. Nothing is done (None) for
    a database that already has tables or for PostgreSQL: migrating a shared server stays a
    deliberate ``sijnode db upgrade`` by its administrator, and an older SQLite schema is
    reported by :func:`check_schema_current` rather than changed behind the user's back.
    """
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        if inspect(engine).get_table_names():
            return None
        return upgrade(engine)
    finally:
        engine.dispose()
