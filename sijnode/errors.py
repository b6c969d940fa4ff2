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


class UnknownJobError(AuditError):
    """A job id names no row of the audit's ``jobs`` table (a message for a job that was
    never created there, or another database)."""


class TransitionError(SijnodeError):
    """A study or job was asked to move to a state its lifecycle does not allow from where
    it is (:mod:`sijnode.db.lifecycle`)."""


class MixedInputsError(SijnodeError):
    """A job's instances do not all come from one study and one patient pseudonym."""


class ReportError(SijnodeError):
    """A result could not be turned into valid DICOM outputs (SR, secondary captures, KOS)."""


class TrainingDataError(SijnodeError):
    """A training data set has problems; each is named with its file or line and reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        shown = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) in the training data:\n{shown}{more}")


class CheckpointError(SijnodeError):
    """A model checkpoint is refused: truncated, tampered, unknown architecture, wrong task."""


class SeriesError(SijnodeError):
    """A series cannot be read as an ordered stack of slices (geometry, sizes, frames)."""


class PipelineError(SijnodeError):
    """A pipeline cannot be loaded or run with the models and options it was given."""


class DeliveryError(SijnodeError):
    """A result could not be prepared for delivery or a delivery could not be changed."""


class TrainingError(SijnodeError):
    """A training run cannot start or continue (run directory, device, resume mismatch)."""


class EvaluationError(SijnodeError, ValueError):
    """Accuracy metrics cannot be computed from what they were given (labels that are not
    0/1, scores of another length, NaN, an unknown metric, an empty set of folds). Also a
    ValueError, as these are bad arguments."""
