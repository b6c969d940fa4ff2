"""Migrations: empty to head on SQLite and PostgreSQL, no drift from the models, and the
start-up schema check with its message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, inspect, text
from typer.testing import CliRunner

from sijnode.db import cli as db_cli
from sijnode.db.engine import make_engine
from sijnode.db.migrate import (
    MIGRATIONS_DIR,
    check_schema_current,
    current_revision,
    downgrade,
    head_revision,
    schema_status,
    upgrade,
    upgrade_sql,
)
from sijnode.db.schema import Base
from sijnode.errors import SchemaOutOfDateError

ALL_TABLES = set(Base.metadata.tables)


def _diffs(url: str, metadata: MetaData = Base.metadata) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_head_is_the_initial_revision_and_scripts_are_packaged() -> None:
    assert head_revision() == "0004"
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()


def test_upgrade_from_empty_to_head(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        with pytest.raises(SchemaOutOfDateError, match="run `sijnode db upgrade`") as info:
            check_schema_current(engine)
        assert "empty database" in str(info.value)

        assert upgrade(db_url) == head_revision()
        assert current_revision(engine) == head_revision()
        assert check_schema_current(engine) == head_revision()
        assert schema_status(engine).up_to_date
        tables = set(inspect(engine).get_table_names())
        assert ALL_TABLES | {"alembic_version"} == tables
        assert upgrade(db_url) == head_revision()  # idempotent
    finally:
        engine.dispose()


def test_postgres_migrates_inside_the_search_path_schema(pg_url: str) -> None:
    upgrade(pg_url)
    schema = pg_url.rsplit("%3D", 1)[1]
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            where = conn.execute(
                text(
                    "select table_schema from information_schema.tables "
                    "where table_name in ('alembic_version', 'studies') "
                    "and table_schema in (:schema, 'public')"
                ),
                {"schema": schema},
            ).scalars()
            assert list(where) == [schema, schema]
    finally:
        engine.dispose()


def test_autogenerate_finds_no_drift(db_url: str) -> None:
    """Guards against schema drift: a column added to schema.py needs a migration."""
    upgrade(db_url)
    assert _diffs(db_url) == []


def test_drift_check_would_see_a_new_column(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["studies"].append_column(Column("new_thing", Integer, nullable=True))
    diffs = _diffs(sqlite_url, changed)
    assert [d[0] for d in diffs if isinstance(d, tuple)] == ["add_column"]


def test_downgrade_to_base_removes_everything(db_url: str) -> None:
    upgrade(db_url)
    assert downgrade(db_url, "base") is None
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_unknown_revision_says_sijnode_is_older(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("update alembic_version set version_num = '9999'"))
        with pytest.raises(SchemaOutOfDateError, match="newer sijnode"):
            check_schema_current(engine)
    finally:
        engine.dispose()


def test_offline_sql_for_review() -> None:
    sql = upgrade_sql("postgresql+psycopg://u@h/db")
    assert "CREATE TABLE studies" in sql
    assert "CREATE TABLE alembic_version" in sql


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    db_cli.register(app)
    return app


def test_cli_db_upgrade_and_current(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_DATABASE__URL", db_url)
    runner = CliRunner()
    app = _app()
    result = runner.invoke(app, ["db", "current", "--check"])
    assert result.exit_code == 1
    assert "out of date: run `sijnode db upgrade`" in result.output

    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "upgraded from empty to 0004" in result.output
    result = runner.invoke(app, ["db", "upgrade"])
    assert "already at revision 0004" in result.output

    result = runner.invoke(app, ["db", "current", "--check"])
    assert result.exit_code == 0
    assert "revision 0004, head 0004, up to date" in result.output


def test_audit_command_on_old_schema_tells_to_upgrade(tmp_path: object) -> None:
    """Through the real entry point: one line on stderr, exit status 1."""
    url = f"sqlite:///{tmp_path}/old.db"
    proc = subprocess.run(
        [sys.executable, "-c", "from sijnode.cli import main; main()", "audit", "studies"],
        env={"SIJNODE_DATABASE__URL": url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "error: audit database" in proc.stderr
    assert "run `sijnode db upgrade`" in proc.stderr
