"""Hot-path statements: SQLAlchemy Core compiled once, run on the DB-API cursor.

The ingest path writes a few rows for every received instance, hundreds of times a
second, and SQLAlchemy's execution layer costs more than SQLite itself there. So those
statements are compiled once per dialect, with SQLAlchemy's own compiler and its type
processors (dates, enums, JSON come out exactly as the ORM writes them), and run on the
raw cursor of the session's connection, inside the session's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from sijnode.errors import AuditError


class PreparedStatement:
    """One Core statement for one dialect; ``execute`` returns the DB-API cursor."""

    def __init__(
        self,
        statement: ClauseElement,
        dialect: Dialect,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(column_keys or []))
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        names = compiled.bind_names  # bind parameter -> its name in the SQL
        self._names = sorted(set(names.values()))
        # values fixed in the statement itself (e.g. the state an UPDATE compares with)
        self._defaults = {
            name: bind.value
            for bind, name in names.items()
            if not bind.required and bind.value is not None
        }
        self._order = list(compiled.positiontup or []) if dialect.positional else None
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for bind, name in names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._processors[name] = processor
        self._error: type[Exception] = dialect.loaded_dbapi.Error

    def execute(self, connection: Connection, params: Mapping[str, Any]) -> Any:
        """Run with ``params`` (every bind name the statement has, by name)."""
        values = self._defaults | dict(params)
        missing = [name for name in self._names if name not in values]
        if missing:
            raise AuditError(f"statement parameters missing: {', '.join(missing)}")
        for key, processor in self._processors.items():
            if key in values:
                values[key] = processor(values[key])
        args: Any = tuple(values[k] for k in self._order) if self._order is not None else values
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, args)
        except self._error as exc:
            raise AuditError(f"audit database write failed: {type(exc).__name__}: {exc}") from exc
        return cursor


def run_pipelined(
    connection: Connection, batch: Sequence[tuple[PreparedStatement, Mapping[str, Any]]]
) -> list[Any]:
    """Run ``batch`` in order and return the cursors; in one round trip where the driver
    has a pipeline mode (psycopg 3 with PostgreSQL), one after the other otherwise."""
    dbapi = connection.connection.dbapi_connection
    pipeline = getattr(dbapi, "pipeline", None)
    if pipeline is None:
        # Each result is read at once: on SQLite a SELECT left unread keeps its snapshot,
        # and a write after it in the same transaction can fail with "database is locked".
        return [_Fetched(statement.execute(connection, params)) for statement, params in batch]
    errors = tuple({statement._error for statement, _ in batch})
    try:
        with pipeline():
            cursors = [statement.execute(connection, params) for statement, params in batch]
    except errors as exc:
        raise AuditError(f"audit database write failed: {type(exc).__name__}: {exc}") from exc
    return cursors


class _Fetched:
    """A cursor's rows and row count, read as soon as the statement ran."""

    def __init__(self, cursor: Any) -> None:
        self.rowcount = cursor.rowcount
        self._rows = list(cursor.fetchall()) if cursor.description is not None else []
        cursor.close()

    def fetchall(self) -> list[Any]:
        return self._rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None
