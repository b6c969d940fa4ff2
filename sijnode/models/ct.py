"""The CT pipeline (Fu et al. 2024): ResNeXt-50 32x4d slice classifier, study decision.

``predict``: read and order the series (``series``), decode and preprocess slices in worker
threads while the model runs batches (``runtime``), a probability per slice, the study
decision (``aggregate.ct_study``), closed-form Grad-CAM of the explained slices mapped back
onto each slice (``cam``). Imports nothing from ``db/``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Generic, Literal, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from sijnode.errors import PipelineError, SeriesError
from sijnode.models import cam
from sijnode.models.aggregate import ct_study
from sijnode.models.architectures import forward_features
from sijnode.models.checkpoint import load_model
from sijnode.models.preprocess import Letterbox, ct_slice
from sijnode.models.registry import LoadedPipeline, PredictOptions, StudyInput, register
from sijnode.models.result import (
    AlgorithmIdentity,
    Decision,
    Explanation,
    Finding,
    PipelineResult,
    SliceResult,
)
from sijnode.models.runtime import Runner, StageTimes, resolve_device, resolve_precision
from sijnode.models.series import Series, batched, prefetch, read_series
from sijnode.models.spec import CTPreprocessing, ModelSpec, MRPreprocessing

#: Fewer slices than this is not a CT study the pipeline decides on.
MIN_CT_SLICES = 1


def choose_series(study: StudyInput, modality: str, min_slices: int) -> tuple[Series, list[str]]:
    """The routed series with the most slices; notes on the others (recorded as a step)."""
    if not study.series:
        raise SeriesError(f"study has no {modality} series routed to this pipeline")
    ordered = sorted(study.series, key=lambda s: (-len(s.paths), s.series_instance_uid))
    chosen = ordered[0]
    notes = [f"{s.series_instance_uid}: {len(s.paths)} instances, not used" for s in ordered[1:]]
    series = read_series(
        chosen.series_instance_uid, chosen.paths, min_slices=min_slices, modality=modality
    )
    return series, notes


P = TypeVar("P", CTPreprocessing, MRPreprocessing)


class PredictStart(NamedTuple, Generic[P]):
    """What both pipelines' ``predict`` begin with (:func:`start_predict`)."""

    started: float
    spec: ModelSpec
    prep: P
    slice_threshold: float
    #: The decision threshold: ``pipelines.<name>.threshold`` if set, else the spec's own.
    threshold: float
    times: StageTimes
    series: Series
    notes: list[str]


def start_predict(
    specs: Mapping[str, ModelSpec],
    options: PredictOptions,
    study: StudyInput,
    prep_type: type[P],
    level: Literal["study", "subject"],
    modality: str,
    min_slices: int,
) -> PredictStart[P]:
    """The classifier's spec, preprocessing and thresholds (the decision threshold at
    ``level``: the study's for CT, the subject's for MR), a stage clock, and the chosen
    series, read while timed."""
    started = time.perf_counter()
    spec = specs["model"]
    prep = spec.preprocessing
    assert isinstance(prep, prep_type)
    ops = spec.operating_points
    decision = ops.study_threshold if level == "study" else ops.subject_threshold
    assert ops.slice_threshold is not None and decision is not None
    times = StageTimes()
    series, notes = times.timed("decode", lambda: choose_series(study, modality, min_slices))
    threshold = options.threshold if options.threshold is not None else decision
    return PredictStart(started, spec, prep, ops.slice_threshold, threshold, times, series, notes)


def side_of_column(series: Series, column: float) -> str:
    """Patient side ("R"/"L") of an image column (ImageOrientationPatient row direction)."""
    image_left = column < series.columns / 2.0
    return "R" if image_left == series.column_towards_patient_left else "L"


def combine_lateralities(sides: list[str | None]) -> str | None:
    found = {s for s in sides if s}
    return "B" if found == {"R", "L"} else (found.pop() if found else None)


def classify_with_cams(
    model: torch.nn.Module, head: torch.nn.Module, times: StageTimes, x: torch.Tensor
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """One batch through a ResNet-family classifier: the sigmoid probabilities (timed as
    ``infer``) and the raw closed-form Grad-CAM maps from the same forward (``explain``)."""
    t = time.perf_counter()
    features = forward_features(model, x)
    probabilities = torch.sigmoid(features.logits.float()).cpu().numpy()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    times.add("infer", time.perf_counter() - t)
    t = time.perf_counter()
    maps = cam.raw_cams(head, features).cpu().numpy()
    times.add("explain", time.perf_counter() - t)
    return probabilities, maps


@dataclass
class LoadedCT:
    """The CT pipeline with its classifier warm on ``device``."""

    name: str
    device: str
    specs: dict[str, ModelSpec]
    runner: Runner
    options: PredictOptions

    def predict(self, study: StudyInput) -> PipelineResult:
        started, spec, prep, slice_threshold, study_threshold, times, series, notes = start_predict(
            self.specs, self.options, study, CTPreprocessing, "study", "CT", MIN_CT_SLICES
        )

        def load(index: int) -> tuple[npt.NDArray[np.float32], Letterbox]:
            hu = times.timed("decode", lambda: series.decode(index))
            return times.timed("preprocess", lambda: ct_slice(hu, prep, spec.input_size))

        head = self.runner.model.get_submodule("fc")
        scores: list[float] = []
        raw_maps: list[npt.NDArray[np.float32]] = []
        placements: list[Letterbox] = []

        forward = partial(classify_with_cams, self.runner.model, head, times)

        feed = prefetch(
            range(len(series)),
            load,
            threads=self.options.decode_threads,
            ahead=2 * self.options.batch_size,
        )
        for batch in batched(feed, self.options.batch_size):
            inputs = np.stack([x for x, _ in batch])
            placements.extend(p for _, p in batch)
            for probabilities, maps in self.runner.run(inputs, forward):
                scores.extend(float(p) for p in probabilities)
                raw_maps.extend(maps)
        aggregate = ct_study(
            scores, study_threshold, spec.aggregation.median_size, spec.aggregation.top_k
        )
        slices = tuple(
            SliceResult(
                sop_instance_uid=h.sop_instance_uid,
                series_instance_uid=series.series_instance_uid,
                position_index=i,
                instance_number=h.instance_number,
                score=scores[i],
                filtered_score=float(aggregate.filtered[i]),
                positive=bool(aggregate.filtered[i] >= slice_threshold),
            )
            for i, h in enumerate(series.slices)
        )
        t = time.perf_counter()
        explained = sorted(
            (s for s in slices if s.positive), key=lambda s: (-s.score, s.position_index)
        )[: self.options.max_explained]
        explanations = []
        for s in explained:
            on_input = cam.upsample(raw_maps[s.position_index], spec.input_size)
            heatmap = cam.to_uint8(placements[s.position_index].to_source(on_input))
            region = cam.peak_region(heatmap)
            side = side_of_column(series, (region.column0 + region.column1) / 2.0)
            explanations.append(Explanation.of_slice(s, heatmap, region, side))
        times.add("explain", time.perf_counter() - t)
        decision = Decision.PRESENT if aggregate.positive else Decision.ABSENT
        times.add("total", time.perf_counter() - started)
        return PipelineResult(
            pipeline=self.name,
            finding=Finding.SACROILIITIS,
            decision=decision,
            probability=float(np.clip(aggregate.score, 0.0, 1.0)),
            threshold=study_threshold,
            slice_threshold=slice_threshold,
            aggregation=spec.aggregation.rule,
            aggregation_parameters={
                "median_size": spec.aggregation.median_size,
                "top_k": spec.aggregation.top_k,
                "top_indices": list(aggregate.top_indices),
                "study_score": aggregate.score,
            },
            study_instance_uid=study.study_instance_uid,
            slices=slices,
            explanations=tuple(explanations),
            algorithm=algorithm_identity(spec),
            device=str(self.runner.device),
            precision=self.runner.precision,
            stage_seconds=times.result(),
            laterality=(
                combine_lateralities([e.laterality for e in explanations])
                if decision is Decision.PRESENT
                else None
            ),
            steps={
                "series": {
                    "series_instance_uid": series.series_instance_uid,
                    "slices": len(series),
                    "order": "position along the slice normal",
                    "not_used": notes,
                },
                "preprocessing": prep.model_dump(mode="json", exclude={"whitening"})
                | {"whitening": prep.whitening is not None},
                "batch_size": self.runner.batch_size,
                "oom_retries": self.runner.oom_retries,
                "explained": [e.position_index for e in explanations],
                "threshold_source": "settings" if self.options.threshold is not None else "spec",
            },
        )


def algorithm_identity(spec: ModelSpec, **extra: str) -> AlgorithmIdentity:
    """TID 4019 algorithm identification from the spec."""
    ops = spec.operating_points
    parameters = {
        "architecture": spec.architecture,
        "weights_sha256": spec.weights_sha256,
        "slice_threshold": str(ops.slice_threshold),
        "aggregation": spec.aggregation.rule,
    }
    if ops.study_threshold is not None:
        parameters["study_threshold"] = str(ops.study_threshold)
    if ops.subject_threshold is not None:
        parameters["subject_threshold"] = str(ops.subject_threshold)
    return AlgorithmIdentity(name=spec.name, version=spec.version, parameters=parameters | extra)


def load_runner(path: Path | str, task: str, device: str, options: PredictOptions) -> Runner:
    """Verify and load one checkpoint onto ``device`` as a warm :class:`Runner`."""
    model, spec = load_model(path, "cpu", expected_task=task)
    precision = resolve_precision(spec, device, options.precision)
    return Runner(model, spec, device, precision, options.batch_size)


@dataclass(frozen=True)
class CTPipeline:
    """Registered as ``ct``: needs one ``model`` (a CT slice classifier)."""

    name: str = "ct"
    task: str = "ct_slice_classifier"
    requires: tuple[str, ...] = ("model",)

    def load(
        self,
        models: Mapping[str, Path | str],
        device: str = "cpu",
        options: PredictOptions | None = None,
    ) -> LoadedPipeline:
        options = options or PredictOptions()
        missing = [role for role in self.requires if role not in models]
        if missing:
            raise PipelineError(f"pipeline {self.name!r}: expected models {missing}, found none")
        device = resolve_device(device)
        runner = load_runner(models["model"], self.task, device, options)
        return LoadedCT(self.name, device, {"model": runner.spec}, runner, options)


register(CTPipeline())
