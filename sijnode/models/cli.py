"""``sijnode models import|list|show|verify``: versioned checkpoints in the data directory.

``import`` verifies a checkpoint in full (spec, architecture, task, length, weights hash,
and that the weights' tensor names and shapes fit the architecture;
:func:`sijnode.models.checkpoint.verify_checkpoint` with ``fit``), copies it to
``<data_dir>/models/<version>.safetensors`` and records its row (version, task, spec, file)
in the audit, so ``pipelines.<name>.model`` can name the version. Heavy imports happen
inside the commands; only ``import`` and ``verify`` import torch, to build the
architecture on the meta device (no memory for weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sijnode.audit.render import OutputFormat as Format
from sijnode.cli_context import add_group, audit_session, group_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sijnode.models.spec import ModelSpec
    from sijnode.settings import Settings, SettingsLoader

models_app = typer.Typer(
    help="Model checkpoints: import, list, show and verify (no downloads).",
    no_args_is_help=True,
)

TASKS = ("ct_slice_classifier", "mr_roi_classifier", "si_joint_localizer")

TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task", help=f"Refuse a checkpoint of another task ({', '.join(TASKS)}, ct, mr)."
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table, json or csv.")]


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``models`` to the ``sijnode`` app; ``settings`` loads this invocation's settings."""
    add_group(app, models_app, "models", settings)


def _task(value: str | None) -> str | None:
    """``ct``/``mr`` are short for the pipeline's classifier task."""
    from sijnode.models.identity import PIPELINE_TASKS

    if value is None:
        return None
    task = PIPELINE_TASKS.get(value, value)
    if task not in TASKS:
        raise typer.BadParameter(
            f"expected one of {', '.join(TASKS)} (or ct, mr), got {value!r}", param_hint="--task"
        )
    return task


def _copy_durably(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a fsynced temporary file and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_model(settings: Settings, file: Path, task: str | None = None) -> tuple[ModelSpec, Path]:
    """Verify ``file``, copy it under the data directory and record its row."""
    from sijnode.models.checkpoint import verify_checkpoint
    from sijnode.models.identity import imported_path
    from sijnode.workers.model_records import record_model

    spec = verify_checkpoint(file, expected_task=task, fit=True)
    target = imported_path(settings.data_dir, spec.version)
    if not (target.is_file() and target.stat().st_size == file.stat().st_size):
        _copy_durably(file, target)
    verify_checkpoint(target, expected_task=task)  # the copy is what workers will load
    with audit_session(settings) as session:
        record_model(session, spec, target, settings.data_dir)
    return spec, target


@models_app.command("import")
def import_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A .safetensors checkpoint with its spec.")],
    task: TaskOpt = None,
) -> None:
    """Verify a checkpoint, copy it into <data_dir>/models and record it in the audit."""
    spec, target = import_model(group_settings(ctx), file, _task(task))
    typer.echo(
        f"imported {spec.version} ({spec.task}, {spec.name}, {spec.architecture}) -> {target}"
    )


def _row_dict(row: Any) -> dict[str, Any]:
    return {
        "version": row.version,
        "task": row.task,
        "name": row.name,
        "architecture": row.architecture,
        "weights_sha256": row.weights_sha256,
        "size_bytes": row.size_bytes,
        "path": row.path,
        "imported_at": row.imported_at,
    }


@models_app.command("list")
def list_command(ctx: typer.Context, output_format: FormatOpt = Format.table) -> None:
    """The imported models, newest first."""
    from sqlalchemy import select

    from sijnode.audit.render import render
    from sijnode.db.schema import ModelRecord

    with audit_session(group_settings(ctx)) as session:
        rows = [
            _row_dict(r)
            for r in session.scalars(
                select(ModelRecord).order_by(ModelRecord.imported_at.desc(), ModelRecord.id.desc())
            )
        ]
    columns = ("version", "task", "name", "architecture", "size_bytes", "imported_at")
    typer.echo(render(rows, output_format, columns))


def _model_row(session: Session, version: str) -> Any:
    from sqlalchemy import select

    from sijnode.db.schema import ModelRecord
    from sijnode.errors import SijnodeError

    row = session.scalars(select(ModelRecord).where(ModelRecord.version == version)).first()
    if row is None:
        raise SijnodeError(f"no imported model of version {version!r}: see `sijnode models list`")
    return row


def _file_of(settings: Settings, row: Any) -> Path:
    path = Path(row.path)
    return path if path.is_absolute() else settings.data_dir / path


@models_app.command("show")
def show_command(
    ctx: typer.Context, version: Annotated[str, typer.Argument(help="Model version.")]
) -> None:
    """The whole spec of an imported model, its file and where it is used (JSON)."""
    from sijnode.audit.render import render_json

    settings = group_settings(ctx)
    with audit_session(settings) as session:
        row = _model_row(session, version)
        data = {**_row_dict(row), "file": str(_file_of(settings, row)), "spec": row.spec}
    data["file_exists"] = Path(data["file"]).is_file()
    data["configured_as"] = [
        f"pipelines.{name}.{key}"
        for name, pipeline in settings.pipelines.items()
        for key in ("model", "localizer")
        if getattr(pipeline, key) == version
    ]
    typer.echo(render_json(data))


@models_app.command("verify")
def verify_command(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="An imported version or a checkpoint file.")],
    task: TaskOpt = None,
) -> None:
    """Check a checkpoint in full (spec, task, length, weights hash, tensors fit the
    architecture); exit 1 naming the fault."""
    from sijnode.errors import CheckpointError
    from sijnode.models.checkpoint import verify_checkpoint
    from sijnode.models.identity import looks_like_file

    settings = group_settings(ctx)
    expected = _task(task)
    if looks_like_file(target) or Path(target).is_file():
        spec = verify_checkpoint(Path(target), expected_task=expected, fit=True)
        typer.echo(f"ok: {target} is {spec.version} ({spec.task}, {spec.name}), weights intact")
        return
    with audit_session(settings) as session:
        row = _model_row(session, target)
        path = _file_of(settings, row)
        recorded = (row.version, row.weights_sha256)
    if not path.is_file():
        raise CheckpointError(f"model {target}: its file {path} is missing")
    spec = verify_checkpoint(path, expected_task=expected, fit=True)
    if (spec.version, spec.weights_sha256) != recorded:
        raise CheckpointError(
            f"model {target}: the file {path} now holds {spec.version} (weights "
            f"{spec.weights_sha256[:12]}), the audit recorded {recorded[0]} "
            f"(weights {recorded[1][:12]})"
        )
    typer.echo(f"ok: {target} at {path} matches its audit row, weights intact")
