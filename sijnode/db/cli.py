"""Commands of the db part: ``sijnode db upgrade|current`` (schema migrations).

Heavy imports (SQLAlchemy, Alembic) happen inside the commands so that ``sijnode --help``
stays fast. The audit commands (``sijnode audit ...``) live in :mod:`sijnode.audit.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from sijnode.settings import SettingsLoader


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``sijnode db`` to the ``sijnode`` app; ``settings`` loads this invocation's
    settings."""
    db_app = typer.Typer(help="The audit database: schema migrations.", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @db_app.command("upgrade")
    def db_upgrade(
        revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
        sql: Annotated[
            bool, typer.Option("--sql", help="Print the SQL instead of running it (for review).")
        ] = False,
    ) -> None:
        """Create or migrate the audit database schema to the newest revision."""
        upgrade_schema(settings().database.url, revision, sql=sql)

    @db_app.command("current")
    def db_current(
        check: Annotated[
            bool,
            typer.Option("--check", help="Exit 1 if the schema is not at the newest revision."),
        ] = False,
    ) -> None:
        """Show the schema revision of the audit database and the newest one."""
        if not show_schema(settings().database.url) and check:
            raise typer.Exit(1)


def upgrade_schema(url: str, revision: str, *, sql: bool = False) -> None:
    """Migrate the database at ``url`` to ``revision`` (or print the SQL) and say what
    changed, with the password of ``url`` hidden."""
    from sqlalchemy.engine import make_url

    from sijnode.db.engine import make_engine
    from sijnode.db.migrate import current_revision, upgrade, upgrade_sql

    shown = make_url(url).render_as_string(hide_password=True)
    if sql:
        typer.echo(upgrade_sql(url, revision))
        return
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        after = upgrade(engine, revision)
    finally:
        engine.dispose()
    if before == after:
        typer.echo(f"{shown}: already at revision {after}")
    else:
        typer.echo(f"{shown}: upgraded from {before or 'empty'} to {after}")


def show_schema(url: str) -> bool:
    """Print the schema revision of the database at ``url`` and the newest one; return
    whether it is up to date."""
    from sqlalchemy.engine import make_url

    from sijnode.db.engine import make_engine
    from sijnode.db.migrate import schema_status

    engine = make_engine(url)
    try:
        status = schema_status(engine)
    finally:
        engine.dispose()
    shown = make_url(url).render_as_string(hide_password=True)
    verdict = "up to date" if status.up_to_date else "out of date: run `sijnode db upgrade`"
    typer.echo(
        f"{shown}: revision {status.current or 'none (empty)'}, head {status.head}, {verdict}"
    )
    return status.up_to_date
