"""Record: the audit database schema, migrations, pseudonyms, queries and metrics."""
