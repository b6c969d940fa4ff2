"""Engines and sessions for the audit database: one engine per process, passed in.

SQLite (embedded) runs in WAL mode with foreign keys on. ``synchronous=FULL`` (the default,
``database.sqlite_synchronous``) fsyncs every commit; with ``NORMAL`` a committed row
survives a crash of the process but the last commits before a power loss may not.
The spool does not depend on it: every instance file is fsynced before Success, and
start-up recovery records any spooled file that has no row (docs/receiving.md).
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
    synchronous = {"full": "FULL", "normal": "NORMAL"}[sqlite_synchronous]
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
