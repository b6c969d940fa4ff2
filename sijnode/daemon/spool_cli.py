"""``sijnode spool status`` and ``sijnode spool purge``: the retention policy by hand.

The same rules as the node's sweeper (:mod:`sijnode.daemon.retention`); safe to run while
the node runs (a removal claims its intent and locks its study in the audit).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sijnode.daemon.retention import Retention
    from sijnode.settings import SettingsLoader, StorageSettings


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _retention(settings: SettingsLoader) -> tuple[Retention, StorageSettings]:
    from sijnode.daemon.retention import Retention
    from sijnode.daemon.spool import Spool
    from sijnode.db.engine import make_engine, make_sessionmaker
    from sijnode.db.migrate import check_schema_current

    loaded = settings()
    engine = make_engine(loaded.database.url, sqlite_synchronous=loaded.database.sqlite_synchronous)
    check_schema_current(engine)
    storage = loaded.storage
    spool = Spool(storage.spool_dir, storage.min_free_mb * 2**20)
    return Retention(storage, make_sessionmaker(engine), spool, data_dir=loaded.data_dir), storage


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add the ``spool`` group to the ``sijnode`` app."""
    spool = typer.Typer(help="The spool of received instances and its retention.")
    app.add_typer(spool, name="spool", no_args_is_help=True)

    @spool.command("status")
    def status(
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        limit: int = typer.Option(10, "--next", help="How many of the next removals to list."),
    ) -> None:
        """Bytes by retention state, free space, and the next removals."""
        retention, storage = _retention(settings)
        current = retention.status()
        by_state = current.bytes_by_state()
        upcoming = sorted(
            (s for s in current.studies if s.verdict.due_at is not None),
            key=lambda s: (s.verdict.due_at, s.study_id),
        )[:limit]
        if as_json:
            shown: dict[str, Any] = {
                "bytes": {state.value: size for state, size in by_state.items()},
                "studies": {
                    state.value: sum(1 for s in current.studies if s.state is state)
                    for state in by_state
                },
                "free_bytes": current.free_bytes,
                "purge_below_free_bytes": current.purge_below_free_bytes,
                "min_free_bytes": storage.min_free_mb * 2**20,
                "next_removals": [
                    {
                        "study_id": s.study_id,
                        "study_instance_uid": s.study_instance_uid,
                        "state": s.state.value,
                        "due_at": s.verdict.due_at.isoformat() if s.verdict.due_at else None,
                        "files": s.files,
                        "outputs": s.outputs,
                        "bytes": s.bytes,
                    }
                    for s in upcoming
                ],
            }
            typer.echo(json.dumps(shown, indent=2))
            return
        typer.echo(
            f"spool {storage.spool_dir}: retention {storage.retention}, "
            f"waiting {storage.retention_waiting}"
        )
        for state, size in by_state.items():
            n = sum(1 for s in current.studies if s.state is state)
            typer.echo(f"  {state.value:<10} {_mib(size):>14}  {n} studies")
        typer.echo(
            f"free {_mib(current.free_bytes)}; disk pressure below "
            f"{_mib(current.purge_below_free_bytes)}; refused below {storage.min_free_mb} MiB"
        )
        if upcoming:
            typer.echo("next removals:")
        for s in upcoming:
            assert s.verdict.due_at is not None
            typer.echo(
                f"  {s.verdict.due_at:%Y-%m-%d %H:%M:%S}Z  study {s.study_id} "
                f"{s.study_instance_uid}  {s.state.value}  {s.files} files  {_mib(s.bytes)}"
            )

    @spool.command("purge")
    def purge(
        dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go."),
        study: str | None = typer.Option(
            None, "--study", help="StudyInstanceUID: remove this study's files now, if final."
        ),
    ) -> None:
        """Apply the retention policy now (as the sweeper does), or to one study.

        ``--study`` removes a finished study before its retention ends (reason
        ``manual``); a study still receiving or with a job not final is refused.
        """
        from sqlalchemy import select

        from sijnode.daemon.retention import RemovalReason
        from sijnode.db.engine import transaction
        from sijnode.db.schema import Study
        from sijnode.errors import SijnodeError

        retention, _ = _retention(settings)
        if study is None:
            if dry_run:
                plan = retention.status().plan()
                for item, reason in plan:
                    typer.echo(
                        f"would remove study {item.study_id} {item.study_instance_uid}: "
                        f"{item.files} files, {_mib(item.bytes)} ({reason.value})"
                    )
                typer.echo(f"{len(plan)} studies would be removed")
                return
            report = retention.sweep()
            for result in report.removed:
                typer.echo(
                    f"removed study {result.study_id}: {result.files} files, "
                    f"{_mib(result.bytes)} ({result.reason.value})"
                )
            typer.echo(f"{len(report.removed)} studies removed, {report.files} files")
            if report.unrelieved:
                typer.echo("disk pressure: nothing left that may be removed", err=True)
            return
        with transaction(retention.sessions) as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study))
        if study_id is None:
            raise SijnodeError(f"no study with StudyInstanceUID {study!r} in the audit")
        found = next((s for s in retention.status().studies if s.study_id == study_id), None)
        if found is None:
            typer.echo(f"study {study_id}: no files left in the spool")
            return
        if found.state.value not in ("kept", "eligible"):
            raise SijnodeError(
                f"study {study_id} is {found.state.value}: expected a finished study "
                "(kept or eligible); its files are needed"
            )
        if dry_run:
            typer.echo(
                f"would remove study {study_id}: {found.files} files, {_mib(found.bytes)} (manual)"
            )
            return
        result = retention.remove_study(study_id, RemovalReason.MANUAL, max_files=2**31)
        if result.refused is not None:
            raise SijnodeError(f"study {study_id} is {result.refused.value}: not removed")
        typer.echo(f"removed study {study_id}: {result.files} files, {_mib(result.bytes)}")
