"""Placeholder for revision 0003 (owner D1); replaced by the real file at merge.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """No-op stub."""


def downgrade() -> None:
    """No-op stub."""
