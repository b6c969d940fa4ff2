"""Engines and sessions for the audit database: one engine per process, passed in.

SQLite (embedded) runs in WAL mode with foreign keys on. ``synchronous=FULL`` fsyncs every
commit; with ``NORMAL`` a committed row survives a crash of the process but the last
commits before a power loss may not (SQLite, "PRAGMA synchronous": in WAL mode NORMAL
stays consistent, it may only lose the most recent transactions). ``database.sqlite_synchronous``
chooses: ``full`` (every commit FULL), ``spool`` (the default: FULL, except the receive hot
path's single instance row, committed through :func:`fresh_row_sessions` with NORMAL) or
``normal``. The spool does not depend on it: every instance file is fsynced before Success,
and start-up recovery records any spooled file that has no row (docs/receiving.md).
PostgreSQL uses psycopg 3 and its server's own durability settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.schema import Event, EventType
from sijnode.errors import AuditError


def make_engine(url: str, echo: bool = False, sqlite_synchronous: str = "full") -> Engine:
    """Create the engine for ``url``; creates the SQLite file's directory if needed."""
    synchronous = {"full": "FULL", "spool": "FULL", "normal": "NORMAL"}[sqlite_synchronous]
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # hide_parameters: a failed statement's message never carries bound values (identifiers)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, hide_parameters=True)


def fresh_row_sessions(
    sessions: sessionmaker[Session], sqlite_synchronous: str
) -> sessionmaker[Session]:
    """Sessions for the receive hot path's one-row commits (``sqlite_synchronous = "spool"``).

    With SQLite in ``spool`` mode they come from a second engine on the same file with
    ``synchronous=NORMAL``: the commit of a new instance's row skips its WAL fsync. The
    row's content is in the instance file, fsynced before Success, so a power loss that
    takes the most recent of these commits (never one before a FULL commit: that fsyncs
    the whole WAL) leaves spooled files without rows, which start-up recovery records
    (docs/receiving.md, "Durability of the audit row"). Otherwise ``sessions`` itself.
    """
    engine = sessions.kw.get("bind")
    if (
        sqlite_synchronous != "spool"
        or not isinstance(engine, Engine)
        or engine.url.get_backend_name() != "sqlite"
        or engine.url.database in (None, "", ":memory:")
    ):
        return sessions
    url = engine.url.render_as_string(hide_password=False)
    return make_sessionmaker(make_engine(url, echo=bool(engine.echo), sqlite_synchronous="normal"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (they are read back often)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back and raise AuditError on failure."""
    session = factory()
    try:
        yield session
        session.commit()
    except SQLAlchemyError as exc:
        session.rollback()
        raise AuditError(f"audit database write failed: {exc.__class__.__name__}: {exc}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def record_event(
    session: Session,
    type_: EventType,
    *,
    study_id: int | None = None,
    job_id: int | None = None,
    association_id: int | None = None,
    **detail: Any,
) -> Event:
    """Append an event in the caller's transaction (never in a separate one)."""
    ev = Event(
        type=type_,
        study_id=study_id,
        job_id=job_id,
        association_id=association_id,
        detail=detail,
    )
    session.add(ev)
    return ev
