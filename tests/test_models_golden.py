"""Golden outputs: fixed synthetic series, fixed seeded weights, stored probabilities.

The same pipelines on CUDA are marked ``gpu`` (skipped without one) and must agree within
a looser tolerance (TF32 off; cuDNN kernels differ from CPU ones).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sijnode.models.registry import PredictOptions, SeriesInput, StudyInput, get_pipeline
from sijnode.models.result import (
    Decision,
    PipelineResult,
    load_result,
    result_to_dict,
    save_result,
)
from tests.models_support import (
    ct_checkpoint,
    ct_study,
    localizer_checkpoint,
    mr_checkpoint,
    mr_study,
    truth_boxes,
)

#: CT: 6 slices of synth seed 3 (positive, left), ResNeXt-50 at 64², seeded weights 5.
CT_GOLDEN = [0.748902, 0.756265, 0.744846, 0.753374, 0.756869, 0.741599]
CT_INSTANCE_ORDER = [6, 5, 4, 3, 2, 1]  # InstanceNumber 1 is the top slice: ordered upwards
CT_STUDY_SCORE = 0.7533735632896423
#: MR: 6 slices of synth seed 3 (positive, both), ResNet18 at 64², noise on, fixed boxes.
MR_GOLDEN = [0.538178, 0.51387, 0.504007, 0.538256, 0.560142, 0.588582]
MR_SUBJECT_PROBABILITY = 0.542149692773819

CPU_TOL = 1e-4
GPU_TOL = 3e-3


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def _ct(tmp_path: Path, device: str) -> tuple[list[float], PipelineResult]:
    _, study = ct_study(tmp_path / "ct")
    path, _ = ct_checkpoint(tmp_path)
    pipeline = get_pipeline("ct").load(
        {"model": path}, device, PredictOptions(batch_size=4, max_explained=2)
    )
    result = pipeline.predict(study)
    return [s.score for s in result.slices], result


def _mr(tmp_path: Path, device: str) -> tuple[list[float], PipelineResult]:
    synth, study = mr_study(tmp_path / "mr")
    model, _ = mr_checkpoint(tmp_path)
    localizer, _ = localizer_checkpoint(tmp_path, truth_boxes(synth))
    pipeline = get_pipeline("mr").load(
        {"model": model, "localizer": localizer},
        device,
        PredictOptions(batch_size=4, max_explained=2),
    )
    result = pipeline.predict(study)
    return [s.score for s in result.slices], result


def test_ct_golden_cpu(tmp_path: Path) -> None:
    scores, result = _ct(tmp_path, "cpu")
    np.testing.assert_allclose(scores, CT_GOLDEN, atol=CPU_TOL)
    assert [s.instance_number for s in result.slices] == CT_INSTANCE_ORDER
    assert result.probability == pytest.approx(CT_STUDY_SCORE, abs=CPU_TOL)
    assert result.decision is Decision.PRESENT
    assert result.device == "cpu" and result.precision == "fp32"
    assert set(result.stage_seconds) >= {"decode", "preprocess", "localise", "infer", "explain"}
    assert len(result.explanations) == 2
    for explanation in result.explanations:
        assert explanation.heatmap.shape == (512, 512)
        assert explanation.heatmap.dtype == np.uint8 and explanation.heatmap.max() == 255


def test_mr_golden_cpu(tmp_path: Path) -> None:
    scores, result = _mr(tmp_path, "cpu")
    np.testing.assert_allclose(scores, MR_GOLDEN, atol=CPU_TOL)
    assert result.probability == pytest.approx(MR_SUBJECT_PROBABILITY, abs=CPU_TOL)
    assert result.decision is Decision.PRESENT
    steps = result.steps
    assert steps["noise"]["enabled"] and steps["noise"]["seed"] > 0
    assert len(steps["localisation"]["accepted"]) == 6 and not steps["localisation"]["rejected"]
    assert len(result.explanations) == 2
    for explanation in result.explanations:
        assert explanation.laterality in {"R", "L"} and explanation.heatmap.shape == (448, 448)
        roi = steps["localisation"]["accepted"][explanation.position_index]["roi"]
        outside = np.ones((448, 448), dtype=bool)
        for x0, y0, x1, y1 in roi:
            outside[y0:y1, x0:x1] = False
        assert not explanation.heatmap[outside].any()  # the map lives in the two ROI boxes
    assert result.laterality in {"R", "L", "B"}
    # The same study gives the same answer (the noise step is seeded from the study).
    again, _ = _mr(tmp_path / "again", "cpu")
    assert again == scores


@pytest.mark.gpu
def test_ct_golden_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    scores, result = _ct(tmp_path, "cuda")
    np.testing.assert_allclose(scores, CT_GOLDEN, atol=GPU_TOL)
    assert result.device.startswith("cuda")


@pytest.mark.gpu
def test_mr_golden_gpu(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    scores, _ = _mr(tmp_path, "cuda")
    np.testing.assert_allclose(scores, MR_GOLDEN, atol=GPU_TOL)


def test_result_round_trips_through_json_and_npz(tmp_path: Path) -> None:
    _, result = _ct(tmp_path, "cpu")
    save_result(result, tmp_path / "out")
    back = load_result(tmp_path / "out")
    assert result_to_dict(back) == result_to_dict(result)
    for a, b in zip(result.explanations, back.explanations, strict=True):
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        assert b.heatmap.dtype == np.uint8


def test_threshold_override_and_series_choice(tmp_path: Path) -> None:
    """A settings threshold overrides the spec's (recorded); the largest series is used."""
    _, study = ct_study(tmp_path / "ct", n_slices=3)
    path, _ = ct_checkpoint(tmp_path)
    (series,) = study.series
    extra = SeriesInput("1.2.3.4", series.paths[:1])
    two = StudyInput(study.study_instance_uid, (extra, series), study.seed)
    strict = get_pipeline("ct").load({"model": path}, "cpu", PredictOptions(threshold=0.99))
    result = strict.predict(two)
    assert result.threshold == 0.99 and result.decision is Decision.ABSENT
    assert result.steps["threshold_source"] == "settings"
    assert result.steps["series"]["series_instance_uid"] == series.series_instance_uid
    assert result.steps["series"]["not_used"] == ["1.2.3.4: 1 instances, not used"]
    assert len(result.slices) == 3
