"""Audit rows of models: imported checkpoints and the model sets that jobs record.

Pipelines (``sijnode/models``) import nothing from ``db/``; these functions are the worker's
and the ``sijnode models`` command's side. Every job that ran has a ``model_version`` whose
:class:`~sijnode.db.schema.ModelSetMember` rows name the :class:`ModelRecord` of each model
it used, with the whole spec.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.schema import ModelRecord, ModelSetMember
from sijnode.models.identity import ModelIdentity, ModelRef
from sijnode.models.spec import ModelSpec


def stored_path(path: Path, data_dir: Path) -> str:
    """``path`` relative to ``data_dir`` when it lies inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path(os.path.abspath(data_dir))))
    except ValueError:
        return str(absolute)


def record_model(session: Session, spec: ModelSpec, path: Path, data_dir: Path) -> ModelRecord:
    """The row of ``spec``'s version, created if there is none (idempotent)."""
    row = session.scalars(select(ModelRecord).where(ModelRecord.version == spec.version)).first()
    if row is not None:
        return row
    row = ModelRecord(
        version=spec.version,
        task=spec.task,
        name=spec.name,
        architecture=spec.architecture,
        weights_sha256=spec.weights_sha256,
        spec=spec.model_dump(mode="json"),
        path=stored_path(path, data_dir),
        size_bytes=path.stat().st_size,
    )
    session.add(row)
    session.flush()
    return row


def record_model_set(session: Session, identity: ModelIdentity, data_dir: Path) -> None:
    """Rows for every model of ``identity`` and the set members under its version."""
    known = {
        m.role
        for m in session.scalars(
            select(ModelSetMember).where(ModelSetMember.set_version == identity.version)
        )
    }
    member: ModelRef
    for member in identity.members:
        record_model(session, member.spec, member.path, data_dir)
        if member.role not in known:
            session.add(
                ModelSetMember(
                    set_version=identity.version,
                    pipeline=identity.pipeline,
                    role=member.role,
                    model_version=member.version,
                )
            )
    session.flush()
