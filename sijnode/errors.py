"""The one root exception of sijnode and its specific subclasses.

Every error the node raises on purpose derives from :class:`SijnodeError`, so callers
can catch the node's own failures without catching programming errors.
"""


class SijnodeError(Exception):
    """Root of every error sijnode raises on purpose."""


class ConfigurationError(SijnodeError):
    """A setting is missing or invalid."""


class SpoolError(SijnodeError):
    """An instance could not be written durably to the spool."""


class DiskFullError(SpoolError):
    """Free space on the spool volume is below the configured minimum."""


class InvalidInstanceError(SijnodeError):
    """A received object is not a storable DICOM instance (bad UID, unreadable header)."""


class AuditError(SijnodeError):
    """The audit database could not be written or read."""


class SchemaOutOfDateError(AuditError):
    """The audit database schema is not at the head migration."""


class TruthImportError(SijnodeError):
    """A ground-truth file has bad rows; nothing was imported."""


class SynthesisError(SijnodeError):
    """A synthetic study could not be generated with the requested parameters."""


class DispatchError(SijnodeError):
    """A job could not be queued."""


class NoModelError(SijnodeError):
    """No model is configured for the pipeline a job needs."""


class DeliveryError(SijnodeError):
    """A result could not be prepared for delivery or a delivery could not be changed."""
