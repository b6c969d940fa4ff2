"""Record: the audit database schema, engine, migrations, records, pseudonyms."""
