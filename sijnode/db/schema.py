"""The audit schema: typed SQLAlchemy 2.0 models.

Owned by sijnode and changed only through Alembic migrations (``sijnode/db/migrations``).
No patient names, birth dates or raw identifiers: PatientID and AccessionNumber are stored
as keyed HMAC pseudonyms (:mod:`sijnode.db.pseudonyms`). The ``events`` table is the
append-only trail; every state change writes its event in the same transaction.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now in UTC; every timestamp in the audit is UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime; naive values (SQLite) are taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a stable constraint naming convention for migrations."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class AssociationOutcome(enum.StrEnum):
    """How an association ended."""

    ACTIVE = "active"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


class StudyState(enum.StrEnum):
    """Where a study is in assembly (docs/study-completion.md)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    DISPATCHED = "dispatched"
    IGNORED = "ignored"


class JobState(enum.StrEnum):
    """The life of one inference job."""

    QUEUED = "queued"
    RUNNING = "running"
    NO_MODEL = "no_model"
    INFERRED = "inferred"
    REPORTED = "reported"
    DELIVERED = "delivered"
    SHADOW = "shadow"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class OutputKind(enum.StrEnum):
    """Kinds of DICOM object the node emits."""

    SR = "sr"
    SC = "sc"
    KOS = "kos"


class DeliveryStatus(enum.StrEnum):
    """State of one delivery to one destination."""

    PENDING = "pending"
    RETRYING = "retrying"
    #: Stored; waiting for the peer's Storage Commitment result (PS3.4 J.3).
    COMMITTING = "committing"
    DELIVERED = "delivered"
    DEAD = "dead"
    #: Shadow mode: recorded, never sent.
    SHADOW = "shadow"


class EventType(enum.StrEnum):
    """Every kind of event in the append-only trail."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    ASSOCIATION_CLOSED = "association_closed"
    INSTANCE_STORED = "instance_stored"
    INSTANCE_DUPLICATE = "instance_duplicate"
    INSTANCE_CONFLICT = "instance_conflict"
    INSTANCE_REFUSED = "instance_refused"
    STUDY_RECEIVING = "study_receiving"
    STUDY_COMPLETE = "study_complete"
    STUDY_REOPENED = "study_reopened"
    STUDY_IGNORED = "study_ignored"
    STUDY_DISPATCHED = "study_dispatched"
    SERIES_UID_REUSED = "series_uid_reused"
    JOB_CREATED = "job_created"
    JOB_DUPLICATE = "job_duplicate"
    JOB_DISPATCHED = "job_dispatched"
    JOB_STATE = "job_state"
    JOB_SUPERSEDED = "job_superseded"
    PREDICTION_RECORDED = "prediction_recorded"
    OUTPUT_RECORDED = "output_recorded"
    DELIVERY_ATTEMPT = "delivery_attempt"
    DELIVERY_REQUEUED = "delivery_requeued"
    TRUTH_IMPORTED = "truth_imported"
    NODE_STARTED = "node_started"
    RECOVERY = "recovery"
    JOB_DISPATCH_FAILED = "job_dispatch_failed"
    SPOOL_PURGED = "spool_purged"
    INSTANCE_RESTORED = "instance_restored"
    #: A Storage Commitment N-EVENT-REPORT for a transaction no delivery awaits.
    COMMITMENT_UNKNOWN = "commitment_unknown"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        validate_strings=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


class Association(Base):
    """One DICOM association, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    outcome: Mapped[AssociationOutcome] = mapped_column(
        _enum(AssociationOutcome, "association_outcome"), default=AssociationOutcome.ACTIVE
    )
    reject_reason: Mapped[str | None] = mapped_column(Text)


class Study(Base):
    """A study as assembled by the node; one row per StudyInstanceUID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    site: Mapped[str] = mapped_column(String(64), default="default")
    state: Mapped[StudyState] = mapped_column(
        _enum(StudyState, "study_state"), default=StudyState.RECEIVING, index=True
    )
    generation: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    completion_reason: Mapped[str | None] = mapped_column(String(64))
    ignored_reason: Mapped[str | None] = mapped_column(Text)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))

    series: Mapped[list[Series]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Series(Base):
    """A series within a study, with the equipment that made it.

    Keyed by (study, SeriesInstanceUID): a series belongs to exactly one study, and
    another study that reuses the UID gets its own row (docs/receiving.md).
    """

    __tablename__ = "series"
    __table_args__ = (
        UniqueConstraint("study_id", "series_instance_uid", name="uq_series_study_id_series_uid"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model_name: Mapped[str | None] = mapped_column(String(64))
    station_name: Mapped[str | None] = mapped_column(String(64))
    image_type: Mapped[str | None] = mapped_column(String(128))
    #: Plane from ImageOrientationPatient: axial, coronal, sagittal or oblique-<plane>.
    orientation: Mapped[str | None] = mapped_column(String(32))
    #: What the content says the series should hold (ImagesInAcquisition and the like).
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received instance, kept in the spool as its original bytes."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256", name="uq_instances_uid_sha"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(Text)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    #: Position along the slice normal (mm), for slice-gap checks; null without geometry.
    slice_position: Mapped[float | None] = mapped_column(Float)
    #: True when another copy of this SOP Instance UID with different bytes exists.
    conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Study generation this instance arrived in; late instances bump the generation.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    #: When the spool file was removed (sijnode.daemon.retention); null while it is kept.
    removed_at: Mapped[datetime | None]
    #: Why: retention, disk_pressure or manual (:class:`RemovalReason`).
    removed_reason: Mapped[str | None] = mapped_column(String(16))

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One inference job: a pipeline run over the selected series of a study."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_key: Mapped[str] = mapped_column(String(64), unique=True)
    route: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(32), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64), index=True)
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Spool paths relative to the spool root, in the order the pipeline reads them.
    spool_paths: Mapped[list[str]] = mapped_column(JSON, default=list)
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, "job_state"), default=JobState.QUEUED, index=True
    )
    shadow: Mapped[bool] = mapped_column(Boolean, default=False)
    study_generation: Mapped[int] = mapped_column(Integer, default=1)
    superseded_by_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    worker_host: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: The worker run that holds the job now (a random token per claim), and until when:
    #: the holder renews it while it runs; a lapsed lease means the holder died
    #: (docs/workers.md, "One run at a time").
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None]
    stage_timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    dispatched_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="jobs")
    transitions: Mapped[list[JobTransition]] = relationship(
        back_populates="job", order_by="JobTransition.id"
    )
    predictions: Mapped[list[Prediction]] = relationship(back_populates="job")
    outputs: Mapped[list[Output]] = relationship(back_populates="job")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")


class JobTransition(Base):
    """Every state change of a job, with its time (append-only)."""

    __tablename__ = "job_transitions"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="transitions")


class Prediction(Base):
    """A subject- or study-level result of a job (PROTOCOLS.md B, subject decision)."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    level: Mapped[str] = mapped_column(String(16), default="study")
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    aggregation: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="predictions")
    slices: Mapped[list[SliceScore]] = relationship(
        back_populates="prediction", order_by="SliceScore.position_index"
    )


class SliceScore(Base):
    """One slice's score within a prediction."""

    __tablename__ = "slice_scores"

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    position_index: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    filtered_score: Mapped[float | None] = mapped_column(Float)

    prediction: Mapped[Prediction] = relationship(back_populates="slices")


class Output(Base):
    """A DICOM object the node emitted for a job (SR, SC, KOS)."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[OutputKind] = mapped_column(_enum(OutputKind, "output_kind"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: When the file at ``path`` was removed (sijnode.daemon.retention); null while kept.
    removed_at: Mapped[datetime | None]
    removed_reason: Mapped[str | None] = mapped_column(String(16))

    job: Mapped[Job] = relationship(back_populates="outputs")


class Delivery(Base):
    """Sending a job's outputs to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: dicom (C-STORE), stow (STOW-RS) or webhook (triage notification).
    kind: Mapped[str] = mapped_column(String(16), default="dicom", server_default="dicom")
    #: SOP Instance UIDs the peer acknowledged in the last attempt.
    sop_instance_uids: Mapped[list[str] | None] = mapped_column(JSON, default=list)
    #: DIMSE or HTTP status of the last failure (0xA700, 503, ...).
    last_status: Mapped[int | None] = mapped_column(Integer)
    commitment_transaction_uid: Mapped[str | None] = mapped_column(UID, index=True)
    committed_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="deliveries")
    attempt_log: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id"
    )


class GroundTruth(Base):
    """A reference label for a study, imported for validation (``audit truth import``)."""

    __tablename__ = "ground_truth"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "reader_id", name="uq_ground_truth_study_reader"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    label: Mapped[bool] = mapped_column(Boolean)
    reader_id: Mapped[str] = mapped_column(String(64), default="")
    source_file: Mapped[str | None] = mapped_column(Text)
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Optional per-slice truth: list of 0/1 in slice order, or {SOPInstanceUID: 0/1}.
    slice_labels: Mapped[Any | None] = mapped_column(JSON)


class Reidentification(Base):
    """Pseudonym-to-identifier map; written only with ``allow_reidentification`` on."""

    __tablename__ = "reidentification"

    pseudonym: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    identifier: Mapped[str] = mapped_column(String(64))


class Event(Base):
    """The append-only audit trail."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_type_at", "type", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    type: Mapped[EventType] = mapped_column(_enum(EventType, "event_type"))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class RemovalReason(enum.StrEnum):
    """Why the node removed a spool or output file (docs/receiving.md, "Retention")."""

    RETENTION = "retention"
    DISK_PRESSURE = "disk_pressure"
    MANUAL = "manual"


class RemovalStatus(enum.StrEnum):
    """Where one removal is: its intent is committed before any file is unlinked."""

    PENDING = "pending"
    DONE = "done"
    ROLLED_BACK = "rolled_back"


class SpoolRemoval(Base):
    """One removal of a study's files: the intent, written before any unlink, and its end.

    ``instance_ids`` and ``output_ids`` are the rows whose files it removes; ``files`` and
    ``bytes`` what it did remove (sijnode.daemon.retention, module docstring).
    """

    __tablename__ = "spool_removals"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=RemovalStatus.PENDING, index=True)
    instance_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    output_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    files: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class ModelRecord(Base):
    """An imported model checkpoint: version, spec and file (``sijnode models import``).

    ``version`` is the spec's hash of spec plus weights; a job's ``model_version`` names
    the rows of its model set (:class:`ModelSetMember`), so every job that ran points at
    the whole spec of each model it used.
    """

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(128))
    architecture: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: The file, relative to ``data_dir`` (absolute for a checkpoint used where it lies).
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelSetMember(Base):
    """One model of a pipeline's model set: ``set_version`` is what jobs record.

    A CT set is its one classifier (``set_version`` = the classifier's version); the MR set
    is the ROI classifier plus the SI-joint localiser, under a hash of both versions.
    """

    __tablename__ = "model_set_members"
    __table_args__ = (
        UniqueConstraint("set_version", "role", name="uq_model_set_members_set_role"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    set_version: Mapped[str] = mapped_column(String(64), index=True)
    pipeline: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(ForeignKey("models.version"))


class PredictionDetail(Base):
    """What a pipeline decided beyond the score (one row per prediction).

    The decision (present, absent, indeterminate) and its reason, the slice threshold, the
    aggregation's parameters, the recorded steps (localisation boxes, rejected boxes, noise
    seed), the device and precision, and the result directory relative to ``data_dir``.
    """

    __tablename__ = "prediction_details"

    id: Mapped[int] = mapped_column(primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), unique=True)
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    finding: Mapped[str] = mapped_column(String(64))
    laterality: Mapped[str | None] = mapped_column(String(2))
    slice_threshold: Mapped[float] = mapped_column(Float)
    aggregation_parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    steps: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    algorithm: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    device: Mapped[str] = mapped_column(String(32))
    precision: Mapped[str] = mapped_column(String(16))
    #: ``result.json`` and ``heatmaps.npz`` of the job, relative to ``data_dir``.
    result_dir: Mapped[str | None] = mapped_column(Text)


class DeliveryAttempt(Base):
    """One try of one delivery: when, its outcome, what the peer acknowledged (append-only)."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: delivered, committing, committed, transient, permanent or shadow.
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    sop_instance_uids: Mapped[list[str]] = mapped_column(JSON, default=list)

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_log")
