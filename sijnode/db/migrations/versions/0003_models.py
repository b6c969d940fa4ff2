"""No-op stub of revision 0003 (owner D1): the real file replaces it at merge.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing on this branch."""


def downgrade() -> None:
    """Nothing on this branch."""
