"""Which models a pipeline runs: the model set named by ``pipelines.<name>``, from headers.

``pipelines.<name>.model`` (and ``.localizer`` for the MR pipeline) name an imported model
version (``sijnode models import``: the file is ``<data_dir>/models/<version>.safetensors``)
or a ``.safetensors`` file. The identity is read from each checkpoint's header only
(:func:`sijnode.models.checkpoint.read_spec`): the listener never imports torch and never
reads the weights. The job key includes the set's version, so a re-sent study with the
same content and the same models never runs twice, while a new model, a new threshold or
a new localiser gives a new job (LANDSCAPE.md, lead 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sijnode.errors import ConfigurationError, NoModelError, SijnodeError
from sijnode.models.checkpoint import read_spec
from sijnode.models.spec import SHORT_TASK, ModelSpec
from sijnode.settings import PipelineSettings

#: The classifier task a pipeline named after one expects (any other name takes either).
PIPELINE_TASKS: dict[str, str] = {"ct": "ct_slice_classifier", "mr": "mr_roi_classifier"}

#: Further models a classifier task needs, by role: the MR ROI classifier reads the patches
#: that the SI-joint localiser finds (Lee et al. 2021 set the ROI by hand).
COMPANIONS: dict[str, dict[str, str]] = {"mr_roi_classifier": {"localizer": "si_joint_localizer"}}

#: Subdirectory of ``data_dir`` that ``sijnode models import`` copies checkpoints into.
MODELS_SUBDIR = "models"
CHECKPOINT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelRef:
    """One model of a set: its role, version and checkpoint file."""

    role: str
    spec: ModelSpec
    path: Path

    @property
    def version(self) -> str:
        """The spec's version (hash of spec and weights hash)."""
        return self.spec.version


@dataclass(frozen=True)
class ModelIdentity:
    """A pipeline's model set as recorded with every job.

    A single classifier with no threshold override is known by its own version; a set of
    several models (MR: classifier + localiser) or an override is known by a hash of the
    members' versions and the override, prefixed with the pipeline's short task.
    """

    pipeline: str
    members: tuple[ModelRef, ...]
    threshold: float | None = None

    @property
    def classifier(self) -> ModelRef:
        """The set's classifier (its first member)."""
        return self.members[0]

    @property
    def implementation(self) -> str:
        """Registered pipeline that runs this set: ``ct`` or ``mr`` (the classifier's task)."""
        return SHORT_TASK[self.classifier.spec.task]

    @property
    def version(self) -> str:
        """Version of the whole set; what the job key and ``jobs.model_version`` hold."""
        if len(self.members) == 1 and self.threshold is None:
            return self.classifier.version
        canonical = json.dumps(
            {
                "members": {m.role: m.version for m in self.members},
                "threshold": self.threshold,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return f"{self.implementation}-set-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    @property
    def weights_sha256(self) -> str:
        """The classifier's weights hash, or a hash over every member's weights hash."""
        if len(self.members) == 1:
            return self.classifier.spec.weights_sha256
        joined = "|".join(f"{m.role}={m.spec.weights_sha256}" for m in self.members)
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def checkpoint(self) -> Path:
        """The classifier's checkpoint file."""
        return self.classifier.path

    def checkpoints(self) -> dict[str, Path]:
        """Checkpoint file of each role (``model``, ``localizer``), as ``Pipeline.load`` takes."""
        return {m.role: m.path for m in self.members}


def looks_like_file(value: str) -> bool:
    """Whether a ``model`` setting names a file rather than an imported version."""
    return value.endswith(CHECKPOINT_SUFFIX) or "/" in value or "\\" in value


def imported_path(data_dir: Path, version: str) -> Path:
    """Where ``sijnode models import`` keeps the checkpoint of ``version``."""
    return data_dir / MODELS_SUBDIR / f"{version}{CHECKPOINT_SUFFIX}"


def resolve_model(value: str, data_dir: Path, key: str) -> Path:
    """The checkpoint file a setting names (a version or a path); it must exist."""
    if looks_like_file(value):
        path = Path(value)
        if not path.is_file():
            raise ConfigurationError(f"{key} = {value!r}: expected an existing checkpoint file")
        return path
    path = imported_path(data_dir, value)
    if not path.is_file():
        raise ConfigurationError(
            f"{key} = {value!r}: no imported model of that version (expected {path}); "
            "import it with `sijnode models import FILE` or name a .safetensors file"
        )
    return path


class ModelIdentities:
    """Model sets of the configured pipelines, each header read once.

    A checkpoint's header is read again only when its size or modification time changes,
    so routing a study does not open a file every time.
    """

    def __init__(
        self, pipelines: dict[str, PipelineSettings], data_dir: Path = Path("var")
    ) -> None:
        self.pipelines = pipelines
        self.data_dir = data_dir
        self._specs: dict[tuple[str, int, int], ModelSpec] = {}

    def spec_of(self, path: Path, key: str) -> ModelSpec:
        """The spec in ``path``'s header (cached by size and modification time)."""
        try:
            stat = path.stat()
        except OSError as exc:
            raise ConfigurationError(f"{key}: cannot read {path}: {exc.strerror}") from exc
        cache = (str(path), stat.st_size, stat.st_mtime_ns)
        if cache not in self._specs:
            try:
                self._specs[cache] = read_spec(path)
            except SijnodeError as exc:
                raise ConfigurationError(f"{key}: {exc}") from exc
        return self._specs[cache]

    def _member(self, pipeline: str, role: str, value: str, task: str | None) -> ModelRef:
        key = f"pipelines.{pipeline}.{role}"
        path = resolve_model(value, self.data_dir, key)
        spec = self.spec_of(path, key)
        if not looks_like_file(value) and spec.version != value:
            raise ConfigurationError(
                f"{key} = {value!r}: the file {path.name} holds model {spec.version}, "
                "not that version (re-import it)"
            )
        if task is not None and spec.task != task:
            raise ConfigurationError(
                f"{key} = {value!r}: wrong task: expected a {task!r} model, found "
                f"{spec.task!r} ({spec.name}, {spec.version})"
            )
        if (
            task is None
            and spec.task not in COMPANIONS
            and spec.task not in PIPELINE_TASKS.values()
        ):
            raise ConfigurationError(
                f"{key} = {value!r}: wrong task: expected a classifier "
                f"({', '.join(sorted(PIPELINE_TASKS.values()))}), found {spec.task!r}"
            )
        return ModelRef(role, spec, path)

    def usable(self, pipeline: str) -> bool:
        """Whether ``pipeline`` has a model set that can be used now (configured, readable,
        of the right tasks, with its companions); any such error counts as no."""
        try:
            return self(pipeline) is not None
        except SijnodeError:
            return False

    def __call__(self, pipeline: str) -> ModelIdentity | None:
        """The model set of ``pipeline``, or None without a model.

        Raises :class:`ConfigurationError` for a model that is missing, unreadable or of
        the wrong task, and :class:`NoModelError` naming a companion (the MR localiser)
        that is not configured.
        """
        settings = self.pipelines.get(pipeline)
        if settings is None or settings.model is None:
            return None
        classifier = self._member(pipeline, "model", settings.model, PIPELINE_TASKS.get(pipeline))
        members = [classifier]
        for role, task in COMPANIONS.get(classifier.spec.task, {}).items():
            value = getattr(settings, role, None)
            if value is None:
                raise NoModelError(
                    f"pipeline {pipeline!r} needs an SI-joint {role} ({task}) for its "
                    f"{classifier.spec.task} {classifier.version}: set pipelines.{pipeline}."
                    f"{role} to an imported localiser version or a .safetensors file"
                )
            members.append(self._member(pipeline, role, value, task))
        return ModelIdentity(pipeline, tuple(members), settings.threshold)
