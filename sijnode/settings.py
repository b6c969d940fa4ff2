"""The one typed settings object of sijnode.

Precedence (highest first): command line > ``SIJNODE_*`` environment > TOML file given
with ``--config`` > defaults. Nested keys use ``__`` in the environment, e.g.
``SIJNODE_NODE__AE_TITLE=SIJNODE``. Nothing is read at import time: call
:func:`load_settings`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from sijnode.errors import ConfigurationError
from sijnode.uids import DEFAULT_UID_ROOT, UID_PATTERN

ENV_PREFIX = "SIJNODE_"
DEFAULT_PSEUDONYM_SECRET = "change-me"
ENV_NESTED_DELIMITER = "__"

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("sijnode_config_file", default=None)

#: PS3.5 §6.2: AE titles are at most 16 characters of the default repertoire, no backslash
#: or control characters, and not all spaces.
_AE_TITLE_PATTERN = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE_PATTERN.match(value) or not value.strip():
        raise ValueError(
            f"expected an AE title of 1 to 16 printable ASCII characters without backslash, "
            f"got {value!r} ({len(value)} characters)"
        )
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TLSSettings(_Section):
    """TLS for the listener or a destination (PS3.15 Annex B.1, TLS secure transport)."""

    enabled: bool = Field(False, description="Use TLS on this connection.")
    cert_file: Path | None = Field(None, description="PEM certificate of this node.")
    key_file: Path | None = Field(None, description="PEM private key of this node.")
    ca_file: Path | None = Field(
        None, description="PEM bundle of CAs trusted to sign the peer's certificate."
    )
    require_client_cert: bool = Field(
        False, description="Listener only: require and verify a client certificate (mutual TLS)."
    )

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        missing = [
            name
            for name in ("cert_file", "key_file")
            if self.enabled and getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"expected cert_file and key_file when TLS is enabled, missing {', '.join(missing)}"
            )
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("expected ca_file when require_client_cert is true, got none")
        return self


class NodeSettings(_Section):
    """The DICOM listener (the SCP) and this node's identity."""

    ae_title: str = Field("SIJNODE", description="AE title of the listener (≤ 16 characters).")
    bind_address: str = Field("0.0.0.0", description="Address the listener binds to.")
    port: int = Field(11112, ge=1, le=65535, description="TCP port of the listener.")
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty allows any.",
    )
    allowed_addresses: list[str] = Field(
        default_factory=list,
        description="Source addresses or CIDR networks allowed to connect; empty allows any.",
    )
    accept_any_called_ae_title: bool = Field(
        False,
        description="Accept any called AE title; off: only associations that call ae_title.",
    )
    tls: TLSSettings = Field(default_factory=TLSSettings)
    max_associations: int = Field(
        64,
        ge=1,
        le=1000,
        description="Concurrent associations (each costs a thread and its buffers).",
    )
    receive_mode: Literal["fast", "standard"] = Field(
        "fast",
        description=(
            "'fast' answers each C-STORE on the reader thread; 'standard' uses only "
            "pynetdicom's public API (docs/receiving.md)."
        ),
    )
    max_instances_per_association: int = Field(
        0, ge=0, description="Instances accepted on one association; 0 means unlimited."
    )
    acse_timeout: float = Field(30.0, gt=0, description="ACSE timeout in seconds.")
    dimse_timeout: float = Field(30.0, gt=0, description="DIMSE timeout in seconds.")
    network_timeout: float = Field(60.0, gt=0, description="Network idle timeout in seconds.")
    maximum_pdu_size: int = Field(
        0, ge=0, description="Maximum PDU size the listener receives; 0 means unlimited."
    )
    uid_root: str = Field(
        DEFAULT_UID_ROOT,
        description="UID root for every object sijnode creates (ends with a dot, ≤ 54 chars).",
    )
    site: str = Field("default", description="Site name recorded with every study.")
    stop_grace_seconds: float = Field(
        10.0,
        ge=0,
        description="On SIGTERM: how long open associations may go on before they are "
        "aborted (the instance in flight is answered first).",
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae_title(v)))

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _ae_list(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]

    @field_validator("allowed_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"expected an IP address or CIDR network, got {item!r}") from exc
        return value

    @field_validator("bind_address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError as exc:
            raise ValueError(f"expected an IP address to bind to, got {value!r}") from exc
        return value

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        if not value.endswith(".") or len(value) > 54 or not UID_PATTERN.match(value[:-1]):
            raise ValueError(
                f"expected a UID root that ends with '.' and is at most 54 characters, "
                f"got {value!r}"
            )
        return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str) -> float:
    """Seconds in a duration such as ``7d``, ``12h``, ``30m``, ``30s`` or ``2w``."""
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError(
            f"expected a duration: a number and one of s, m, h, d, w (such as 7d, 12h "
            f"or 30s), got {value!r}"
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


class StorageSettings(_Section):
    """The spool where received instances are kept as their original bytes."""

    spool_dir: Path = Field(Path("var/spool"), description="Spool directory.")
    min_free_mb: int = Field(
        1024, ge=0, description="Refuse instances (0xA700) below this free space, in MiB."
    )
    retention: str = Field(
        "7d",
        description="How long a finished study's files are kept (a duration: 7d, 12h, 30m, "
        "30s) once it is no longer receiving and every job is final, or it was ignored.",
    )
    retention_waiting: str = Field(
        "30d",
        description="How long the files of a study whose job waits (queued, no_model, "
        "delivery retrying) are kept; a running job's inputs are never removed.",
    )
    purge_below_free_mb: int = Field(
        4096,
        ge=0,
        description="Below this free space, in MiB, finished studies are removed oldest "
        "first before their retention ends (min_free_mb when that is higher).",
    )
    sweep_interval_seconds: float = Field(
        60.0, gt=0, description="How often the retention sweeper runs."
    )
    sweep_max_files: int = Field(
        5000, ge=1, description="Most spool files one sweep removes (bounded work per pass)."
    )

    @field_validator("retention", "retention_waiting")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value.strip()

    @property
    def purge_below_free_bytes(self) -> int:
        """The disk-pressure threshold in bytes: never below ``min_free_mb``."""
        return max(self.purge_below_free_mb, self.min_free_mb) * 2**20

    @property
    def retention_seconds(self) -> float:
        """``retention`` in seconds."""
        return parse_duration(self.retention)

    @property
    def retention_waiting_seconds(self) -> float:
        """``retention_waiting`` in seconds."""
        return parse_duration(self.retention_waiting)


class DatabaseSettings(_Section):
    """The SQL audit database."""

    url: str = Field(
        "sqlite:///var/sijnode.db",
        description="SQLAlchemy URL; PostgreSQL in production: postgresql+psycopg://...",
    )
    pseudonym_secret: str = Field(
        DEFAULT_PSEUDONYM_SECRET,
        description="Site secret for the HMAC pseudonyms of PatientID and AccessionNumber.",
        json_schema_extra={"secret": True},
    )
    allow_reidentification: bool = Field(
        False,
        description="Keep a table that maps pseudonyms back to identifiers (off by default).",
    )
    echo: bool = Field(False, description="Log every SQL statement (debugging only).")
    sqlite_synchronous: Literal["full", "spool", "normal"] = Field(
        "spool",
        description=(
            "SQLite only: 'full' fsyncs every commit; 'spool' (the default) fsyncs every commit "
            "but a received instance's own row, which the fsynced spool file restores at "
            "start-up after a power loss; 'normal' fsyncs none: commits survive a crash of the "
            "node but not always a power loss (the fsynced spool is re-recorded at start-up)."
        ),
    )


class BrokerSettings(_Section):
    """The Celery broker; empty means an embedded in-process worker."""

    url: str = Field("", description="Broker URL, e.g. redis://127.0.0.1:6379/0; empty = embedded.")
    result_backend: str = Field("", description="Celery result backend; empty = none.")
    queue: str = Field(
        "sijnode.jobs",
        description="Queue of jobs whose pipeline has no queue of its own (see pipelines).",
    )
    connect_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="Connect and socket timeout of one send to the broker; a send that "
        "fails is left to the reconciler, so the completion loop never waits long.",
    )
    reconcile_interval_seconds: float = Field(
        5.0, gt=0, description="How often the reconciler looks for jobs to send again."
    )
    unclaimed_after_seconds: float = Field(
        900.0,
        gt=0,
        description="A job sent but still queued (no worker claimed it) this long is sent "
        "again (its message may be lost, e.g. Redis restarted without persistence).",
    )
    retry_initial_seconds: float = Field(
        5.0, gt=0, description="Wait before the second try to send a job; doubles after each."
    )
    retry_max_seconds: float = Field(
        300.0, gt=0, description="Longest wait between two tries to send one job."
    )
    visibility_timeout_seconds: float = Field(
        7200.0,
        gt=0,
        description=(
            "Redis: a job not acknowledged within this time goes to another worker; "
            "must exceed the longest job."
        ),
    )
    lease_seconds: float = Field(
        30.0,
        ge=1,
        description="A running job's lease: its worker renews it every third of this; a "
        "second message for the job waits while it is live and runs the job again only "
        "once it lapsed (the worker died).",
    )


class CompletionSettings(_Section):
    """When a study counts as complete (docs/study-completion.md)."""

    quiet_seconds: float = Field(
        30.0, gt=0, description="Complete after this long without a new instance."
    )
    content_quiet_seconds: float = Field(
        5.0,
        gt=0,
        description="Shorter quiet period once the content says every series is complete.",
    )
    hard_cap_seconds: float = Field(
        3600.0, gt=0, description="Complete at the latest this long after the first instance."
    )
    check_interval_seconds: float = Field(1.0, gt=0, description="How often studies are checked.")


class RouteSettings(_Section):
    """Which series of a study go to which pipeline. Unset criteria match anything."""

    name: str = Field(..., description="Name of the route, recorded with each job.")
    pipeline: str = Field(..., description="Pipeline that the selected series go to.")
    modality: str = Field(..., description="Modality of the series (CT, MR).")
    body_part: list[str] = Field(
        default_factory=list, description="BodyPartExamined values accepted; empty = any."
    )
    series_description: str = Field(
        "", description="Regular expression searched in SeriesDescription; empty = any."
    )
    image_type_original: bool = Field(
        True, description="Only series whose ImageType starts with ORIGINAL."
    )
    orientation: Literal["any", "axial", "coronal", "sagittal", "oblique-coronal"] = Field(
        "any", description="Slice orientation required."
    )
    min_slices: int = Field(1, ge=1, description="Minimum instances in the series.")
    max_slices: int = Field(0, ge=0, description="Maximum instances in the series; 0 = no limit.")
    destinations: list[str] = Field(
        default_factory=list,
        description="Names of the destinations this route's results go to; empty = all.",
    )
    shadow_mode: bool = Field(
        False, description="Shadow mode for this route only: record results, send nothing."
    )

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"expected a regular expression, got {value!r}: {exc}") from exc
        return value


def _default_routes() -> list[RouteSettings]:
    return [
        RouteSettings(name="ct-pelvis", pipeline="ct", modality="CT"),
        RouteSettings(name="mr-sij", pipeline="mr", modality="MR"),
    ]


class GradCAMSettings(_Section):
    """Grad-CAM explanations rendered as secondary captures."""

    enabled: bool = Field(True, description="Emit Grad-CAM secondary captures.")
    max_images: int = Field(8, ge=0, description="At most this many explained slices per study.")
    threshold: float = Field(
        0.3, ge=0, le=1, description="Heatmap values below this are not blended."
    )
    alpha: float = Field(0.4, ge=0, le=1, description="Opacity of the heatmap colour map.")


class PipelineSettings(_Section):
    """One inference pipeline: its model, operating point, device and queue."""

    model: str | None = Field(
        None,
        description=(
            "Imported model version (`sijnode models list`) or a .safetensors checkpoint file; "
            "without one, jobs wait in the no_model state."
        ),
    )
    localizer: str | None = Field(
        None,
        description=(
            "SI-joint localiser model (version or file) for a pipeline that needs one (mr); "
            "without it, that pipeline's jobs wait in the no_model state."
        ),
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Operating threshold; empty = the checkpoint's own."
    )
    device: str = Field("auto", description="Torch device: auto, cpu, cuda or cuda:N.")
    batch_size: int = Field(16, ge=1, description="Slices per forward pass.")
    queue: str = Field(
        "", description="Celery queue of this pipeline's jobs; empty = sijnode.<name>."
    )
    gradcam: GradCAMSettings = Field(default_factory=GradCAMSettings)

    @model_validator(mode="before")
    @classmethod
    def _renamed_checkpoint(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "checkpoint" in value:
            raise ValueError(
                "checkpoint was renamed: set model to an imported model version or a "
                f".safetensors file, got checkpoint = {value['checkpoint']!r}"
            )
        return value

    @field_validator("model", "localizer")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value


def _default_pipelines() -> dict[str, PipelineSettings]:
    return {"ct": PipelineSettings(), "mr": PipelineSettings()}


class DestinationSettings(_Section):
    """A peer (usually the PACS) that results are sent to: DICOM C-STORE or STOW-RS."""

    name: str = Field(..., description="Name of the destination, used in the audit.")
    kind: Literal["dicom", "stow"] = Field(
        "dicom", description="dicom: C-STORE (PS3.4 B); stow: DICOMweb STOW-RS (PS3.18 10.5)."
    )
    ae_title: str = Field(
        "", validate_default=True, description="AE title of the peer (kind dicom: required)."
    )
    host: str = Field(
        "",
        validate_default=True,
        description="Host name or address of the peer (kind dicom: required).",
    )
    port: int = Field(104, ge=1, le=65535, description="TCP port of the peer (kind dicom).")
    tls: TLSSettings = Field(default_factory=TLSSettings)
    storage_commitment: bool = Field(
        False,
        description=(
            "Ask the peer for Storage Commitment (PS3.4 J, push model); delivered only once "
            "it confirms every object (kind dicom)."
        ),
    )
    url: str = Field("", description="DICOMweb base URL, e.g. http://pacs/dicom-web (kind stow).")
    timeout_seconds: float = Field(
        30.0, gt=0, description="Connection, ACSE, DIMSE and HTTP timeout in seconds."
    )

    @field_validator("ae_title", "host")
    @classmethod
    def _needed_for_dicom(cls, value: str, info: ValidationInfo) -> str:
        if not value:
            if info.data.get("kind", "dicom") == "dicom":
                raise ValueError(
                    f"Field required for a dicom destination: expected {info.field_name}"
                )
            return value
        return _check_ae_title(value) if info.field_name == "ae_title" else value

    @model_validator(mode="after")
    def _what_the_kind_needs(self) -> DestinationSettings:
        if self.kind == "stow" and not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"expected an http:// or https:// url for a stow destination, got {self.url!r}"
            )
        return self


class WebhookSettings(_Section):
    """Triage notification of a positive result to an HTTP endpoint (docs/delivery.md)."""

    url: str = Field("", description="Endpoint that receives a JSON POST; empty disables.")
    include_accession_number: bool = Field(
        False,
        description="Put the study's AccessionNumber in the body (off: no identifiers at all).",
    )
    timeout_seconds: float = Field(10.0, gt=0, description="HTTP timeout in seconds.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// url or empty, got {value!r}")
        return value


class DeliverySettings(_Section):
    """Sending results back to PACS."""

    max_attempts: int = Field(5, ge=1, description="Tries per delivery before dead-lettering.")
    backoff_seconds: float = Field(
        30.0, gt=0, description="First retry delay; doubles with every attempt."
    )
    max_backoff_seconds: float = Field(3600.0, gt=0, description="Longest delay between two tries.")
    shadow_mode: bool = Field(
        False, description="Record results in the audit but send nothing to PACS."
    )
    check_interval_seconds: float = Field(
        1.0, gt=0, description="How often the delivery loop looks for due deliveries."
    )
    commitment_timeout_seconds: float = Field(
        300.0,
        gt=0,
        description="Wait this long for the Storage Commitment result, then send again.",
    )
    commitment_port: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Port of a dedicated listener for N-EVENT-REPORT; 0 = the node's listener takes it."
        ),
    )
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)


#: SR Storage SOP classes that carry the same TID 1500 content (DICOM-OUTPUTS.md).
SR_SOP_CLASSES: dict[str, str] = {
    str(ComprehensiveSRStorage): "Comprehensive SR",
    str(EnhancedSRStorage): "Enhanced SR",
    str(Comprehensive3DSRStorage): "Comprehensive 3D SR",
}


class ReportSettings(_Section):
    """The DICOM objects built from a result (docs/reports.md)."""

    sr_sop_classes: list[str] = Field(
        default_factory=lambda: list(SR_SOP_CLASSES),
        description=(
            "SR SOP classes to propose, best first (Comprehensive 88.33, Enhanced 88.22, "
            "Comprehensive 3D 88.34); the SR is written in the first one the destination accepts."
        ),
    )
    sr_series_number: int = Field(
        9901, ge=1, le=2147483647, description="SeriesNumber of the SR series."
    )
    sc_series_number: int = Field(
        9902, ge=1, le=2147483647, description="SeriesNumber of the Grad-CAM capture series."
    )
    kos: bool = Field(False, description="Also emit a Key Object Selection of the key images.")
    kos_series_number: int = Field(
        9903, ge=1, le=2147483647, description="SeriesNumber of the Key Object Selection."
    )
    sc_jpegls: bool = Field(
        False,
        description="Encode the captures JPEG-LS lossless when the destination accepts it.",
    )
    institution_name: str = Field(
        "", description="InstitutionName written into the outputs; empty leaves it out."
    )

    @field_validator("sr_sop_classes")
    @classmethod
    def _sr_classes(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in SR_SOP_CLASSES]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(
                f"expected distinct SOP Class UIDs out of {', '.join(SR_SOP_CLASSES)}, "
                f"got {value!r}"
            )
        return value


class MetricsSettings(_Section):
    """Prometheus metrics endpoint."""

    port: int = Field(9108, ge=0, le=65535, description="Metrics HTTP port; 0 disables.")
    bind_address: str = Field("127.0.0.1", description="Address the metrics endpoint binds to.")
    worker_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Metrics port of a worker process (sijnode worker, embedded child); 0 = off.",
    )


class LoggingSettings(_Section):
    """Structured logs (JSON lines) without patient identifiers."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_format: bool = Field(True, description="Write JSON lines; false = plain text.")


class Settings(BaseSettings):
    """Every setting of a sijnode process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Field(Path("var"), description="Directory for local state and models.")
    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    routes: list[RouteSettings] = Field(default_factory=_default_routes)
    pipelines: dict[str, PipelineSettings] = Field(default_factory=_default_pipelines)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    reports: ReportSettings = Field(default_factory=ReportSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @field_validator("pipelines", mode="before")
    @classmethod
    def _keep_default_pipelines(cls, value: Any) -> Any:
        """Pipelines are keyed by name: the ones given replace or add to ``ct`` and ``mr``.

        Setting one pipeline (``SIJNODE_PIPELINES__CT__CHECKPOINT``) must not remove the
        other one that a default route names.
        """
        if isinstance(value, Mapping):
            return {**_default_pipelines(), **value}
        return value

    @model_validator(mode="after")
    def _routes_name_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"destinations: expected unique names, got {doubles} twice")
        if "webhook" in names:
            raise ValueError(
                "destinations: 'webhook' is the name of the triage notification "
                "(delivery.webhook); expected another name"
            )
        for index, route in enumerate(self.routes):
            unknown = [n for n in route.destinations if n not in names]
            if unknown:
                raise ValueError(
                    f"routes.{index}.destinations = {route.destinations!r} (route "
                    f"{route.name!r}): expected names from {sorted(names)}, got {unknown}"
                )
        return self

    @model_validator(mode="after")
    def _routes_name_pipelines(self) -> Settings:
        for index, route in enumerate(self.routes):
            if route.pipeline not in self.pipelines:
                raise ValueError(
                    f"routes.{index}.pipeline = {route.pipeline!r} (route {route.name!r}): "
                    f"expected one of {sorted(self.pipelines)}"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Command line (init arguments) > environment > TOML file (see load_settings)."""
        config_file = _CONFIG_FILE.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML settings file; errors name the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"settings file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"settings file {path} is not valid TOML: {exc}") from exc


def environment_layer() -> dict[str, Any]:
    """Return the ``SIJNODE_*`` variables as the settings parse them (nested, JSON decoded).

    Variables that name no setting are left out. A complex value (list, table) that is not
    valid JSON raises :class:`ConfigurationError` naming the variable.
    """
    try:
        return EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigurationError(_describe_bad_environment(exc)) from exc


def env_var_name(key: str) -> str:
    """The environment variable of a dotted settings key: ``node.tls.enabled`` ->
    ``SIJNODE_NODE__TLS__ENABLED``."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(key.split(".")).upper()


def _setting_annotation(parts: Sequence[str]) -> Any:
    """Type of the setting at ``parts`` (field names; table keys for ``dict`` settings).

    Raises ``KeyError`` when the path names no setting.
    """
    annotation: Any = Settings
    for part in parts:
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                raise KeyError(part)
            annotation = field.annotation
        else:
            raise KeyError(part)
    return annotation


#: ``SIJNODE_*`` variables that are not settings: the CLI's ``--config`` and the test suite's.
NON_SETTING_ENV_VARS = re.compile(r"^SIJNODE_(CONFIG|TEST_\w*)$", re.IGNORECASE)


def key_for_env_var(name: str) -> str | None:
    """The dotted settings key that a ``SIJNODE_*`` variable sets, or ``None`` if none.

    ``SIJNODE_NODE__TLS__ENABLED`` -> ``node.tls.enabled``; ``SIJNODE_PIPELINES__CT__DEVICE``
    -> ``pipelines.ct.device``; ``SIJNODE_ROUTES`` (a JSON list) -> ``routes``.
    """
    if not name.upper().startswith(ENV_PREFIX):
        return None
    parts = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
    try:
        _setting_annotation(parts)
    except KeyError:
        return None
    return ".".join(parts)


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """``SIJNODE_*`` variables that name no setting (typos are otherwise ignored)."""
    env = os.environ if environ is None else environ
    return sorted(
        name
        for name in env
        if name.upper().startswith(ENV_PREFIX)
        and not NON_SETTING_ENV_VARS.match(name)
        and key_for_env_var(name) is None
    )


def _describe_bad_environment(exc: SettingsError) -> str:
    lines = ["invalid settings:"]
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        try:
            annotation = _setting_annotation(parts)
        except KeyError:
            continue
        origin = get_origin(annotation)
        complex_type = origin in (list, dict) or (
            isinstance(annotation, type) and issubclass(annotation, BaseModel)
        )
        if not complex_type:
            continue
        try:
            json.loads(value)
        except ValueError:
            example = '["..."]' if origin is list else '{"...": ...}'
            lines.append(
                f"  {'.'.join(parts)} = {value!r} (environment {name}): "
                f"expected JSON, e.g. {example}"
            )
    if len(lines) == 1:
        lines.append(f"  (environment): {exc}")
    return "\n".join(lines)


def format_validation_error(
    exc: ValidationError, layers: Sequence[tuple[str, Mapping[str, Any]]] = ()
) -> str:
    """Name the key, the value, where it came from and what was expected for each error."""
    lines = ["invalid settings:"]
    for err in exc.errors():
        parts = [str(p) for p in err["loc"]]
        value = err.get("input")
        shown = "" if isinstance(value, (dict, BaseModel)) or not parts else f" = {value!r}"
        source = next((name for name, layer in layers if parts and _has_key(layer, parts)), "")
        if source == "environment":
            source = f"environment {_env_var_setting(parts)}".rstrip()
        where = f" ({source})" if source else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "expected a known key, got one that is not a setting (a typo?)"
        key = ".".join(parts)
        lines.append(f"  {key}{shown}{where}: {message}" if key else f"  {message}")
    return "\n".join(lines)


def _env_var_setting(parts: Sequence[str]) -> str:
    """The ``SIJNODE_*`` variable that set the value at ``parts`` (maybe a JSON parent)."""
    names = {name.upper(): name for name in os.environ}
    for end in range(len(parts), 0, -1):
        name = env_var_name(".".join(parts[:end]))
        if name in names:
            return names[name]
    return ""


def _layers(
    config_file: Path | None, overrides: Mapping[str, Any] | None
) -> list[tuple[str, Mapping[str, Any]]]:
    """The sources in precedence order, each as the nested values it sets."""
    return [
        ("command line", overrides or {}),
        ("environment", environment_layer()),
        (f"file {config_file}", read_config_file(config_file) if config_file else {}),
    ]


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the validated settings: ``overrides`` (command line) > environment > file.

    ``overrides`` is nested like the file: ``{"node": {"port": 11113}}``. Raises
    :class:`ConfigurationError` with one line per invalid key.
    """
    layers = _layers(config_file, overrides)  # a missing or broken file is an error, not {}
    token = _CONFIG_FILE.set(config_file)
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigurationError(format_validation_error(exc, layers)) from exc
    finally:
        _CONFIG_FILE.reset(token)


def settings_provenance(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Return the settings and, for each dotted key of :func:`flatten`, where its value
    came from: ``command line``, ``environment``, ``file PATH`` or ``default``."""
    settings = load_settings(config_file, overrides)
    layers = _layers(config_file, overrides)
    origins: dict[str, str] = {}
    for key in flatten(settings.model_dump(mode="json")):
        parts = key.split(".")
        origins[key] = next((name for name, layer in layers if _has_key(layer, parts)), "default")
    return settings, origins


def _has_key(layer: Mapping[str, Any], parts: Sequence[str]) -> bool:
    """Whether ``layer`` sets the value at ``parts``.

    A list (``routes``, ``destinations``) is replaced whole by the source that sets it, so
    every key inside it comes from that source; so does a whole section given as a model.
    """
    node: Any = layer
    for part in parts:
        if isinstance(node, BaseModel):
            return True
        if isinstance(node, Mapping):
            if part not in node:
                return False
            node = node[part]
        elif isinstance(node, list):
            return True
        else:
            return False
    return True


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts and lists into dotted keys (lists of dicts by index)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and data:
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = data
    return out


class SettingsLoader(Protocol):
    """What the command-line root passes to each part's ``register`` (see
    :mod:`sijnode.cli`): call it in a command to get the settings of the invocation,
    ``overrides`` (nested like the file) from the command line on top."""

    def __call__(self, overrides: Mapping[str, Any] | None = None) -> Settings:
        """The validated settings."""
        ...


#: What ``config show`` prints instead of a secret.
MASK = "***"

#: Query parameters of a URL whose values are secrets (libpq ``password``, tokens).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|sslpassword|secret|token|api_key|apikey)=)[^&#]*",
    re.IGNORECASE,
)


def is_secret(field: FieldInfo) -> bool:
    """Whether a setting is a secret: typed ``SecretStr``/``SecretBytes`` or declared with
    ``json_schema_extra={"secret": True}`` (as ``database.pseudonym_secret``)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("secret") is True:
        return True
    types = get_args(field.annotation) or (field.annotation,)
    return any(isinstance(t, type) and issubclass(t, SecretStr | SecretBytes) for t in types)


def mask_url(text: str) -> str:
    """``text`` with the password of a URL (``scheme://user:password@host``) and secret
    query parameters (``?password=...``) replaced by :data:`MASK`; other text unchanged."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    masked = text
    userinfo, at, host = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if colon and password:
            netloc = f"{user}:{MASK}@{host}"
            masked = masked.replace(f"//{parts.netloc}", f"//{netloc}", 1)
    return _SECRET_QUERY.sub(lambda m: m.group("key") + MASK, masked)


def _mask_tree(model: BaseModel, data: Any, prefix: str, masked: set[str]) -> Any:
    """Mask ``data`` (``model`` dumped as JSON) in place; add each masked path to ``masked``."""
    for name, field in type(model).model_fields.items():
        if not isinstance(data, dict) or name not in data:
            continue
        path = f"{prefix}{name}"
        value = getattr(model, name)
        if is_secret(field):
            if data[name] not in (None, ""):
                data[name] = MASK
                masked.add(path)
            continue
        data[name] = _mask_value(value, data[name], path, masked)
    return data


def _mask_value(value: Any, dumped: Any, path: str, masked: set[str]) -> Any:
    if isinstance(value, BaseModel):
        return _mask_tree(value, dumped, f"{path}.", masked)
    if isinstance(value, Mapping) and isinstance(dumped, dict):
        for key, item in value.items():
            if str(key) in dumped:
                dumped[str(key)] = _mask_value(item, dumped[str(key)], f"{path}.{key}", masked)
        return dumped
    if isinstance(value, list | tuple) and isinstance(dumped, list):
        return [_mask_value(item, dumped[i], f"{path}.{i}", masked) for i, item in enumerate(value)]
    if isinstance(dumped, str):
        shown = mask_url(dumped)
        if shown != dumped:
            masked.add(path)
        return shown
    return dumped


def masked_values(settings: Settings) -> tuple[dict[str, Any], set[str]]:
    """The settings as :func:`flatten` keys, safe to print: every secret setting and every
    password in a URL (``database.url``, ``broker.url``, ...) replaced by :data:`MASK`.

    Returns the values and the keys that were masked. A masked list item is named by its
    own key (``destinations.0.url``); a masked list of strings by the list's key.
    """
    masked_paths: set[str] = set()
    data = _mask_tree(settings, settings.model_dump(mode="json"), "", masked_paths)
    values = flatten(data)
    masked = {
        key
        for key in values
        if any(key == p or key.startswith(f"{p}.") or p.startswith(f"{key}.") for p in masked_paths)
    }
    return values, masked
