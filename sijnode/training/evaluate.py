"""``sijnode evaluate MODEL --data DIR``: a checkpoint on a labelled data set, reported
with the training report's tables and plots; and :func:`pipeline_scores`, the node's
pipelines on held-out studies (``predict(StudyInput)``), for tests and the lead's
end-to-end checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sijnode.models.aggregate import ct_study, mr_subject
from sijnode.models.checkpoint import load_model
from sijnode.models.registry import PredictOptions, StudyInput, get_pipeline
from sijnode.models.spec import CTPreprocessing, MRPreprocessing
from sijnode.training import reporting
from sijnode.training.common import predict_proba
from sijnode.training.data import load_dataset
from sijnode.training.engine import Device, resolve_training_device
from sijnode.training.samples import ct_finish, ct_slices, mr_slices


def pipeline_scores(
    pipeline: str,
    models: Mapping[str, Path | str],
    data: Path,
    device: str = "cpu",
    options: PredictOptions | None = None,
) -> tuple[list[int], list[float], list[Any]]:
    """Study labels, the pipeline's study/subject probabilities and the results, for every
    labelled study of the pipeline's modality under ``data`` (one ``predict`` per study)."""
    modality = "CT" if pipeline == "ct" else "MR"
    studies = load_dataset(Path(data), modality)  # type: ignore[arg-type]
    loaded = get_pipeline(pipeline).load(models, device, options)
    labels, scores, results = [], [], []
    for study in studies:
        result = loaded.predict(
            StudyInput.from_paths(
                study.study_instance_uid,
                {study.series_instance_uid: [s.path for s in study.slices]},
            )
        )
        labels.append(study.label)
        scores.append(float(result.probability))
        results.append(result)
    return labels, scores, results


def evaluate_checkpoint(
    model_path: Path,
    data: Path,
    out: Path,
    device: str = "cpu",
    localizer: Path | None = None,
) -> Path:
    """Score the checkpoint; write ``out/report.md``, ``out/metrics.json`` and ROC plots."""
    dev = Device(resolve_training_device(device), quiet=True)
    model, spec = load_model(model_path, dev.name)
    model = model.float()
    out.mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    ops = spec.operating_points
    rows: dict[str, list[dict[str, float]]] = {}
    rocs: list[tuple[str, Any, Any]] = []
    columns: tuple[tuple[str, str], ...]
    if spec.task == "ct_slice_classifier":
        prep = spec.preprocessing
        assert isinstance(prep, CTPreprocessing) and ops.study_threshold is not None
        studies = load_dataset(Path(data), "CT")
        slices = ct_slices(studies, prep, spec.input_size)
        inputs = np.stack([ct_finish(im, prep) for im in slices.images])
        p = predict_proba(model, inputs, dev)
        assert ops.slice_threshold is not None
        rows["Slices"] = [reporting.metrics(slices.labels, p, ops.slice_threshold)]
        truth, study_p = [], []
        for k, study in enumerate(studies):
            study_agg = ct_study(
                p[slices.study == k],
                ops.study_threshold,
                spec.aggregation.median_size,
                spec.aggregation.top_k,
            )
            truth.append(study.label)
            study_p.append(study_agg.score)
        rows["Studies"] = [reporting.metrics(truth, study_p, ops.study_threshold)]
        rocs = [("slices", slices.labels, p), ("studies", truth, study_p)]
        columns = reporting.TABLE1
    elif spec.task == "mr_roi_classifier":
        prep_mr = spec.preprocessing
        assert isinstance(prep_mr, MRPreprocessing)
        assert ops.slice_threshold is not None and ops.subject_threshold is not None
        studies = load_dataset(Path(data), "MR", need_rois=True)
        mr = mr_slices(studies, prep_mr)
        p = predict_proba(model, mr.roi, dev)
        rows["Slices (annotated ROI)"] = [reporting.metrics(mr.labels, p, ops.slice_threshold)]
        truth, subject_p, decisions, filtered = [], [], [], []
        for k, study in enumerate(studies):
            agg = mr_subject(
                p[mr.study == k],
                ops.slice_threshold,
                ops.subject_threshold,
                spec.aggregation.median_size,
            )
            truth.append(study.label)
            subject_p.append(agg.probability)
            decisions.append(float(agg.positive))
            filtered += agg.filtered_decisions.tolist()
        rows["Slices, median filter"] = [reporting.decision_metrics(mr.labels, filtered, p)]
        rows["Subjects (annotated ROI)"] = [reporting.decision_metrics(truth, decisions, subject_p)]
        rocs = [("slices", mr.labels, p), ("subjects", truth, subject_p)]
        if localizer is not None:
            labels, scores, results = pipeline_scores(
                "mr", {"model": model_path, "localizer": localizer}, data, dev.name
            )
            positive = [float(r.decision.value == "present") for r in results]
            rows["Subjects (node pipeline, localiser)"] = [
                reporting.decision_metrics(labels, positive, scores)
            ]
            rocs.append(("subjects, pipeline", labels, scores))
        columns = reporting.TABLE23
    else:
        raise ValueError(f"sijnode evaluate scores classifiers; {spec.task} is a localiser")
    reporting.roc_png(rocs, out / "plots/roc.png")
    import json

    (out / "metrics.json").write_text(
        json.dumps({k: v[0] for k, v in rows.items()}, indent=2, default=lambda x: None)
    )
    lines = [
        f"# Evaluation of {spec.name} ({spec.version}) (research use only)",
        "",
        f"Data: `{Path(data).name}`; thresholds from the checkpoint: slice "
        f"{ops.slice_threshold}, study {ops.study_threshold}, subject {ops.subject_threshold} "
        f"({ops.chosen_by}).",
        "",
        reporting.fold_table(rows, columns, "Level"),
        "",
        "![ROC](plots/roc.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
