"""Audit reporting: listings, a study's timeline, exports, the summary, ground truth and
validation against it, and the ``sijnode audit`` commands. Reads the audit through
:mod:`sijnode.db`; stores nothing but imported reference labels."""
