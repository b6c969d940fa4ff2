"""Receive: the C-STORE listener, durable spool, study assembly, routing and dispatch."""
