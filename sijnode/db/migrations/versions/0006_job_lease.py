"""The job lease: which worker run holds a running job, and until when.

Adds ``lease_token`` and ``lease_expires_at`` to ``jobs``. A worker that claims a job
writes a new token and an expiry it renews while the job runs; a second message for the
job waits while the lease is live and runs the job again only once it has lapsed (the
holder died), so a duplicate delivery never runs a job twice (docs/workers.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_token", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Downgrade the schema (the leases are dropped with it)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
