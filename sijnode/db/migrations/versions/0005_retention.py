"""Spool retention (issue 14): when and why each file was removed, and removal intents.

Adds ``removed_at`` and ``removed_reason`` to ``instances`` and ``outputs`` (the rows stay;
their files go) and the ``spool_removals`` table, whose row is committed before any file
of a removal is unlinked (:mod:`sijnode.daemon.retention`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("instances", "outputs")


def upgrade() -> None:
    """Upgrade the schema."""
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column("removed_reason", sa.String(length=16), nullable=True))
    op.create_table(
        "spool_removals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("instance_ids", sa.JSON(), nullable=False),
        sa.Column("output_ids", sa.JSON(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_spool_removals_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spool_removals")),
    )
    op.create_index(
        op.f("ix_spool_removals_study_id"), "spool_removals", ["study_id"], unique=False
    )
    op.create_index(op.f("ix_spool_removals_status"), "spool_removals", ["status"], unique=False)


def downgrade() -> None:
    """Downgrade the schema (the record of removals is dropped with it)."""
    op.drop_index(op.f("ix_spool_removals_status"), table_name="spool_removals")
    op.drop_index(op.f("ix_spool_removals_study_id"), table_name="spool_removals")
    op.drop_table("spool_removals")
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("removed_reason")
            batch.drop_column("removed_at")
