"""Models: imported checkpoints, the model sets jobs record, and prediction details.

``models`` holds each imported checkpoint's version, spec and file; ``model_set_members``
maps a job's ``model_version`` to the models it ran (MR: classifier and localiser);
``prediction_details`` keeps a prediction's decision, reason, steps, device and
precision.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:55:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("architecture", sa.String(length=64), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("version", name=op.f("uq_models_version")),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_task"), ["task"], unique=False)

    op.create_table(
        "model_set_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("set_version", sa.String(length=64), nullable=False),
        sa.Column("pipeline", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["models.version"],
            name=op.f("fk_model_set_members_model_version_models"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_set_members")),
        sa.UniqueConstraint("set_version", "role", name="uq_model_set_members_set_role"),
    )
    with op.batch_alter_table("model_set_members", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_set_members_set_version"), ["set_version"], unique=False
        )

    op.create_table(
        "prediction_details",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("laterality", sa.String(length=2), nullable=True),
        sa.Column("slice_threshold", sa.Float(), nullable=False),
        sa.Column("aggregation_parameters", sa.JSON(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("algorithm", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("precision", sa.String(length=16), nullable=False),
        sa.Column("result_dir", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_prediction_details_prediction_id_predictions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prediction_details")),
        sa.UniqueConstraint("prediction_id", name=op.f("uq_prediction_details_prediction_id")),
    )


def downgrade() -> None:
    """Downgrade the schema."""
    op.drop_table("prediction_details")
    with op.batch_alter_table("model_set_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_set_members_set_version"))
    op.drop_table("model_set_members")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_task"))
    op.drop_table("models")
