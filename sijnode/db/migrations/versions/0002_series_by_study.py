"""Placeholder for revision 0002 (series by study, owner C1): no schema change here.

The real revision replaces this file when the branches merge; it exists so that 0003
(models) has its fixed parent in the linear chain.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 22:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade the schema (nothing in this placeholder)."""


def downgrade() -> None:
    """Downgrade the schema (nothing in this placeholder)."""
