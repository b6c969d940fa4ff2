"""The MR pipeline (Lee et al. 2021): localise the SI joints, ROI patch, ResNet18, subject.

``predict``: read and order the series lower to upper pelvis (``series``), decode in
worker threads, localise both iliac bones per slice (``localizer``), build the paper's ROI
patch (``roi``) after the seeded noise step when the spec asks for it, a probability per
slice from ResNet18 with a one-hidden-layer head, the subject decision
(``aggregate.mr_subject``) and closed-form Grad-CAM mapped from the joined patch back onto
the two ROI boxes. A series with no plausible joint is an Indeterminate result with that
reason, not a failed job. Imports nothing from ``db/``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sijnode.errors import PipelineError
from sijnode.models import cam
from sijnode.models.aggregate import mr_subject
from sijnode.models.ct import (
    algorithm_identity,
    classify_with_cams,
    combine_lateralities,
    load_runner,
    start_predict,
)
from sijnode.models.localizer import Localizer, SliceBoxes
from sijnode.models.preprocess import intensity_range, mr_roi_input
from sijnode.models.registry import LoadedPipeline, PredictOptions, StudyInput, register
from sijnode.models.result import (
    Decision,
    Explanation,
    Finding,
    PipelineResult,
    SliceResult,
)
from sijnode.models.roi import RoiBoxes, patch_to_slice, roi_boxes
from sijnode.models.runtime import Runner, StageTimes, resolve_device
from sijnode.models.series import Series, batched, prefetch
from sijnode.models.spec import LocalizerPreprocessing, ModelSpec, MRPreprocessing

#: An MR series needs this many slices for the size-3 median filter to mean anything.
MIN_MR_SLICES = 3


@dataclass
class LoadedMR:
    """The MR pipeline with its classifier and localiser warm on ``device``."""

    name: str
    device: str
    specs: dict[str, ModelSpec]
    runner: Runner
    localizer: Localizer
    options: PredictOptions

    def predict(self, study: StudyInput) -> PipelineResult:
        started, spec, prep, slice_threshold, subject_threshold, times, series, notes = (
            start_predict(
                self.specs, self.options, study, MRPreprocessing, "subject", "MR", MIN_MR_SLICES
            )
        )

        shape = (series.rows, series.columns)
        plausible: list[tuple[SliceBoxes, RoiBoxes]] = []
        rejected: list[dict[str, object]] = []
        Decoded = tuple[int, npt.NDArray[np.float32], tuple[float, float], Any]

        def decode(index: int) -> Decoded:
            image = times.timed("decode", lambda: series.decode(index))
            t = time.perf_counter()
            value_range = intensity_range(image, prep.intensity_percentiles)
            prepared = self.localizer.prepare(image, value_range)
            times.add("preprocess", time.perf_counter() - t)
            return index, image, value_range, prepared

        def localised() -> Iterator[tuple[SliceBoxes, RoiBoxes, Decoded]]:
            """Decoded slices (threads), localised batch by batch, plausible ones only."""
            decoded = prefetch(
                range(len(series)), decode, self.options.decode_threads, self.options.batch_size
            )
            for batch in batched(decoded, self.options.batch_size):
                t = time.perf_counter()
                found_list = self.localizer.locate_prepared(
                    [(i, prepared[0], prepared[1], shape) for i, _, _, prepared in batch]
                )
                times.add("localise", time.perf_counter() - t)
                for item, found in zip(batch, found_list, strict=True):
                    if found.boxes is None:
                        rejected.append(found.record())
                        continue
                    rois = roi_boxes(*found.boxes, shape, prep.roi_shift)
                    if rois is None:
                        reason = f"ROI leaves the image after the {prep.roi_shift}×width shift"
                        rejected.append(found.record() | {"reason": reason})
                        continue
                    plausible.append((found, rois))
                    yield found, rois, item

        def load(entry: tuple[SliceBoxes, RoiBoxes, Decoded]) -> npt.NDArray[np.float32]:
            _, rois, (i, image, value_range, _) = entry
            t = time.perf_counter()
            x = mr_roi_input(image, rois, prep, value_range, study.seed, i)
            times.add("preprocess", time.perf_counter() - t)
            return x

        head = self.runner.model.get_submodule("fc")
        scores: list[float] = []
        raw_maps: list[npt.NDArray[np.float32]] = []

        forward = partial(classify_with_cams, self.runner.model, head, times)

        # Decode, localise and ROI preprocessing stream ahead of the classifier's batches.
        feed = prefetch(localised(), load, self.options.decode_threads, 2 * self.options.batch_size)
        for batch in batched(feed, self.options.batch_size):
            for probabilities, maps in self.runner.run(np.stack(batch), forward):
                scores.extend(float(p) for p in probabilities)
                raw_maps.extend(maps)
        rejected.sort(key=lambda r: int(r["position_index"]))  # type: ignore[call-overload]
        steps: dict[str, object] = {
            "series": {
                "series_instance_uid": series.series_instance_uid,
                "slices": len(series),
                "order": "position along the slice normal (lower to upper pelvis)",
                "not_used": notes,
            },
            "localisation": {
                "localizer": self.specs["localizer"].version,
                "accepted": [
                    f.record() | {"roi": [r.left.as_list(), r.right.as_list()]}
                    for f, r in plausible
                ],
                "rejected": rejected,
            },
            "noise": {
                "enabled": prep.noise.enabled,
                "seed": study.seed,
                "gaussian_variance": prep.noise.gaussian_variance,
                "poisson_log_power": prep.noise.poisson_log_power,
            },
            "roi": {"shift": prep.roi_shift, "patch_size": prep.patch_size},
        }
        rules = self.localizer.rules
        if len(plausible) < rules.min_plausible_slices:
            reasons = Counter(str(r.get("reason")) for r in rejected)
            reason = (
                f"no plausible SI joint: the localiser found plausible iliac boxes on "
                f"{len(plausible)} of {len(series)} slices, {rules.min_plausible_slices} needed "
                f"(rejected: {dict(reasons)})"
            )
            times.add("total", time.perf_counter() - started)
            return self._result(
                study,
                Decision.INDETERMINATE,
                0.0,
                subject_threshold,
                (),
                (),
                times,
                steps,
                reason=reason,
                aggregation_parameters={"median_size": spec.aggregation.median_size},
            )

        agg = mr_subject(scores, slice_threshold, subject_threshold, spec.aggregation.median_size)
        slices = tuple(
            SliceResult(
                sop_instance_uid=series.slices[f.position_index].sop_instance_uid,
                series_instance_uid=series.series_instance_uid,
                position_index=f.position_index,
                instance_number=series.slices[f.position_index].instance_number,
                score=scores[k],
                filtered_score=float(agg.filtered_probabilities[k]),
                positive=bool(agg.filtered_decisions[k] >= 0.5),
            )
            for k, (f, _) in enumerate(plausible)
        )
        t = time.perf_counter()
        order = sorted(
            (k for k, s in enumerate(slices) if s.positive), key=lambda k: (-slices[k].score, k)
        )[: self.options.max_explained]
        explanations = [
            self._explain(series, slices[k], plausible[k][1], raw_maps[k]) for k in order
        ]
        times.add("explain", time.perf_counter() - t)
        times.add("total", time.perf_counter() - started)
        decision = Decision.PRESENT if agg.positive else Decision.ABSENT
        return self._result(
            study,
            decision,
            agg.probability,
            subject_threshold,
            slices,
            tuple(explanations),
            times,
            steps
            | {
                "aggregation": {
                    "slice_decisions": agg.decisions.astype(int).tolist(),
                    "filtered_decisions": agg.filtered_decisions.astype(int).tolist(),
                    "subject_result": agg.result,
                },
                "batch_size": self.runner.batch_size,
                "oom_retries": self.runner.oom_retries,
            },
            laterality=(
                combine_lateralities([e.laterality for e in explanations])
                if decision is Decision.PRESENT
                else None
            ),
            aggregation_parameters={
                "median_size": spec.aggregation.median_size,
                "subject_result": agg.result,
                "subject_probability": agg.probability,
            },
        )

    def _explain(
        self, series: Series, s: SliceResult, rois: RoiBoxes, raw: npt.NDArray[np.float32]
    ) -> Explanation:
        spec = self.specs["model"]
        on_patch = cam.upsample(raw, spec.input_size)
        heatmap = cam.to_uint8(patch_to_slice(on_patch, rois, (series.rows, series.columns)))
        region = cam.peak_region(heatmap)
        # The side whose ROI holds the peak: decided in patch space (boxes may overlap).
        _, peak_column = np.unravel_index(int(np.argmax(on_patch)), on_patch.shape)
        joined_width = rois.joined_shape[1]
        in_left = peak_column * joined_width / on_patch.shape[1] < rois.left.width
        image_left_is_right = series.column_towards_patient_left
        side = "R" if in_left == image_left_is_right else "L"
        return Explanation.of_slice(s, heatmap, region, side)

    def _result(
        self,
        study: StudyInput,
        decision: Decision,
        probability: float,
        threshold: float,
        slices: tuple[SliceResult, ...],
        explanations: tuple[Explanation, ...],
        times: StageTimes,
        steps: dict[str, object],
        *,
        reason: str | None = None,
        laterality: str | None = None,
        aggregation_parameters: dict[str, object],
    ) -> PipelineResult:
        spec = self.specs["model"]
        assert spec.operating_points.slice_threshold is not None
        return PipelineResult(
            pipeline=self.name,
            finding=Finding.ACTIVE_SACROILIITIS_BME,
            decision=decision,
            probability=probability,
            threshold=threshold,
            slice_threshold=spec.operating_points.slice_threshold,
            aggregation=spec.aggregation.rule,
            aggregation_parameters=dict(aggregation_parameters),
            study_instance_uid=study.study_instance_uid,
            slices=slices,
            explanations=explanations,
            algorithm=algorithm_identity(
                spec,
                localizer_version=self.specs["localizer"].version,
                localizer_weights_sha256=self.specs["localizer"].weights_sha256,
            ),
            device=str(self.runner.device),
            precision=self.runner.precision,
            stage_seconds=times.result(),
            laterality=laterality,
            reason=reason,
            steps=dict(steps)
            | {"threshold_source": "settings" if self.options.threshold is not None else "spec"},
        )


@dataclass(frozen=True)
class MRPipeline:
    """Registered as ``mr``: needs a ``model`` (MR ROI classifier) and a ``localizer``."""

    name: str = "mr"
    task: str = "mr_roi_classifier"
    requires: tuple[str, ...] = ("model", "localizer")

    def load(
        self,
        models: Mapping[str, Path | str],
        device: str = "cpu",
        options: PredictOptions | None = None,
    ) -> LoadedPipeline:
        options = options or PredictOptions()
        missing = [role for role in self.requires if models.get(role) is None]
        if missing:
            raise PipelineError(
                f"pipeline {self.name!r}: expected checkpoints for {list(self.requires)}, "
                f"missing {missing}"
                + (
                    " (the MR pipeline needs an SI-joint localiser)"
                    if "localizer" in missing
                    else ""
                )
            )
        device = resolve_device(device)
        runner = load_runner(models["model"], self.task, device, options)
        localizer = load_runner(models["localizer"], "si_joint_localizer", device, options)
        assert isinstance(localizer.spec.preprocessing, LocalizerPreprocessing)
        specs = {"model": runner.spec, "localizer": localizer.spec}
        return LoadedMR(self.name, device, specs, runner, Localizer(localizer), options)


register(MRPipeline())
