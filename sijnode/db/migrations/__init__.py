"""Alembic migrations of the audit schema, run programmatically by :mod:`sijnode.db.migrate`."""
