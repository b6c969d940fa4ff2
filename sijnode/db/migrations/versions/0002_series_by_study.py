"""Series keyed by (study, SeriesInstanceUID): a series UID reused by another study no
longer joins the first study's series (issue 9, part 1).

Drops the unique constraint on ``series.series_instance_uid``, adds the unique
(``study_id``, ``series_instance_uid``) pair and a plain index on the UID (the reuse
check looks it up across studies). SQLite rebuilds the table (batch mode); the
``instances`` rows that reference it are kept (:func:`sijnode.db.migrate.upgrade` runs
SQLite migrations with foreign key enforcement off and checks the references after).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    with op.batch_alter_table("series") as batch:
        batch.drop_constraint("uq_series_series_instance_uid", type_="unique")
        batch.create_unique_constraint(
            "uq_series_study_id_series_uid", ["study_id", "series_instance_uid"]
        )
        batch.create_index(
            op.f("ix_series_series_instance_uid"), ["series_instance_uid"], unique=False
        )


def downgrade() -> None:
    """Downgrade the schema; fails if a series UID is by then used by two studies."""
    with op.batch_alter_table("series") as batch:
        batch.drop_index(op.f("ix_series_series_instance_uid"))
        batch.drop_constraint("uq_series_study_id_series_uid", type_="unique")
        batch.create_unique_constraint(
            op.f("uq_series_series_instance_uid"), ["series_instance_uid"]
        )
