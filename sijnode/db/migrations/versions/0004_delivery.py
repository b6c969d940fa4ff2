"""Delivery: kind, acknowledged instances, last status and Storage Commitment on
``deliveries``; the append-only ``delivery_attempts`` log.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(length=16), server_default="dicom", nullable=False)
        )
        batch.add_column(sa.Column("sop_instance_uids", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("last_status", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("commitment_transaction_uid", sa.String(length=64), nullable=True)
        )
        batch.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index(
            batch.f("ix_deliveries_commitment_transaction_uid"),
            ["commitment_transaction_uid"],
            unique=False,
        )
    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("sop_instance_uids", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivery_attempts_delivery_id_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    op.create_index(
        op.f("ix_delivery_attempts_delivery_id"),
        "delivery_attempts",
        ["delivery_id"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_index(op.f("ix_delivery_attempts_delivery_id"), table_name="delivery_attempts")
    op.drop_table("delivery_attempts")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index(batch.f("ix_deliveries_commitment_transaction_uid"))
        batch.drop_column("committed_at")
        batch.drop_column("commitment_transaction_uid")
        batch.drop_column("last_status")
        batch.drop_column("sop_instance_uids")
        batch.drop_column("kind")
