"""Pipelines register themselves here; the worker looks them up by name.

A pipeline is an object with a ``name``, the ``task`` of its main model, the model roles
it ``requires`` (``"model"``, and ``"localizer"`` for MR) and ``load(models, device)``,
which returns a :class:`LoadedPipeline` whose ``predict(StudyInput)`` returns a
:class:`~sijnode.models.result.PipelineResult`. Adding a pipeline is one module that calls
:func:`register` plus one line in ``BUILTIN_PIPELINES``. Nothing here imports torch or
``db/``: the pipeline modules import torch when they are looked up.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from sijnode.errors import PipelineError
from sijnode.models.result import PipelineResult
from sijnode.models.spec import ModelSpec

#: Built-in pipelines: name -> module that registers it on import.
BUILTIN_PIPELINES: dict[str, str] = {
    "ct": "sijnode.models.ct",
    "mr": "sijnode.models.mr",
}


@dataclass(frozen=True)
class SeriesInput:
    """One series of a study: its UID and the absolute paths of its instance files."""

    series_instance_uid: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class StudyInput:
    """What a pipeline reads for one job. ``seed`` seeds every random step (noise)."""

    study_instance_uid: str
    series: tuple[SeriesInput, ...]
    seed: int

    @staticmethod
    def seed_for(study_instance_uid: str) -> int:
        """A deterministic 63-bit seed from the StudyInstanceUID (same study, same answer)."""
        digest = hashlib.sha256(study_instance_uid.encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    @classmethod
    def from_paths(
        cls, study_instance_uid: str, series: Mapping[str, list[Path] | tuple[Path, ...]]
    ) -> StudyInput:
        """Build from {SeriesInstanceUID: paths}, seeded from the study UID."""
        return cls(
            study_instance_uid,
            tuple(SeriesInput(uid, tuple(Path(p) for p in paths)) for uid, paths in series.items()),
            cls.seed_for(study_instance_uid),
        )


@dataclass(frozen=True)
class PredictOptions:
    """Run options a worker passes from its settings (``pipelines.<name>``)."""

    batch_size: int = 16
    #: Explain at most this many positive slices (``gradcam.max_images``); 0 = none.
    max_explained: int = 8
    #: Decode/preprocess threads feeding the batches.
    decode_threads: int = 2
    #: Override of the spec's threshold (``pipelines.<name>.threshold``), or None.
    threshold: float | None = None
    #: Override of the spec's precision on CUDA ("bf16", "fp16", "fp32"), or None.
    precision: str | None = None


@runtime_checkable
class LoadedPipeline(Protocol):
    """A pipeline with its models loaded (warm), ready to predict."""

    name: str
    device: str
    specs: dict[str, ModelSpec]

    def predict(self, study: StudyInput) -> PipelineResult:
        """Classify one study."""
        ...


class Pipeline(Protocol):
    """A registered pipeline (not yet loaded)."""

    @property
    def name(self) -> str: ...

    @property
    def task(self) -> str: ...

    @property
    def requires(self) -> tuple[str, ...]: ...

    def load(
        self,
        models: Mapping[str, Path | str],
        device: str = "cpu",
        options: PredictOptions | None = None,
    ) -> LoadedPipeline:
        """Verify and load the checkpoints named by role; keep them warm."""
        ...


@dataclass
class Registry:
    """Name -> pipeline. One per process (``REGISTRY``); tests may build their own."""

    pipelines: dict[str, Pipeline] = field(default_factory=dict)

    def register(self, pipeline: Pipeline) -> Pipeline:
        existing = self.pipelines.get(pipeline.name)
        if existing is not None and existing is not pipeline:
            if type(existing) is not type(pipeline):
                raise PipelineError(f"pipeline {pipeline.name!r} is registered twice")
        self.pipelines[pipeline.name] = pipeline
        return pipeline

    def get(self, name: str) -> Pipeline:
        if name not in self.pipelines and name in BUILTIN_PIPELINES:
            importlib.import_module(BUILTIN_PIPELINES[name])
        try:
            return self.pipelines[name]
        except KeyError:
            known = sorted({*self.pipelines, *BUILTIN_PIPELINES})
            raise PipelineError(f"unknown pipeline {name!r}: expected one of {known}") from None


REGISTRY = Registry()


def register(pipeline: Pipeline) -> Pipeline:
    """Register ``pipeline`` under its name (called by the pipeline's module on import)."""
    return REGISTRY.register(pipeline)


def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name`` (imports a built-in one on first use)."""
    return REGISTRY.get(name)


def pipeline_names() -> list[str]:
    """Names of the built-in and registered pipelines."""
    return sorted({*REGISTRY.pipelines, *BUILTIN_PIPELINES})
