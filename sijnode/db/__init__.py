"""Record: the audit database schema, engine, migrations, the write functions (records,
prepared statements), pseudonyms, re-identification and the storage of reference labels.
Reading and reporting the audit is :mod:`sijnode.audit`; statistics :mod:`sijnode.evaluation`."""
