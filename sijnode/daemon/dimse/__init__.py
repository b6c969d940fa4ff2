"""The listener's use of pynetdicom below its public API, fenced in :mod:`.fastpath`."""
