"""Closed-form Grad-CAM equals pytorch-grad-cam's GradCAM on both heads (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from sijnode.models import cam
from sijnode.models.architectures import build, forward_features, seeded_state_dict
from sijnode.models.checkpoint import load_model
from sijnode.models.preprocess import ct_slice
from sijnode.models.registry import PredictOptions, get_pipeline
from sijnode.models.series import read_series
from sijnode.models.spec import CTPreprocessing, ModelSpec, ct_spec, mr_spec
from tests.models_support import ct_checkpoint, ct_study

SIZE = 64


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def _model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    model = build(spec)
    model.load_state_dict(seeded_state_dict(spec, seed))
    return model.eval()


def _reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with GradCAM(model=model, target_layers=[model.get_submodule("layer4")]) as gradcam:
        return gradcam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(x))


@pytest.mark.parametrize(
    ("spec", "seed"),
    [(ct_spec(size=SIZE), 5), (mr_spec(size=SIZE), 5), (mr_spec(size=SIZE), 9)],
    ids=["resnext50-linear-head", "resnet18-hidden-head", "resnet18-hidden-head-2"],
)
def test_closed_form_equals_pytorch_grad_cam(spec: ModelSpec, seed: int) -> None:
    model = _model(spec, seed)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        features = forward_features(model, x)
        assert torch.allclose(features.logits, model(x).reshape(-1), atol=1e-6)
        raw = cam.raw_cams(model.get_submodule("fc"), features).numpy()
    mine = np.stack([cam.upsample(r, (SIZE, SIZE)) for r in raw])
    reference = _reference(model, x)
    assert reference.max() > 0.9, (
        "the reference map must be non-trivial for the test to mean anything"
    )
    np.testing.assert_allclose(mine, reference, atol=1e-5)


def test_hidden_head_needs_per_image_weights() -> None:
    """Fixed weights W2·W1 do not give Grad-CAM for a hidden head (DICOM-OUTPUTS.md)."""
    spec = mr_spec(size=SIZE)
    model = _model(spec, 5)
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        features = forward_features(model, x)
        head = model.get_submodule("fc")
        per_image = cam.channel_weights(head, features)
        fixed = head[2].weight @ head[0].weight  # type: ignore[index]
    assert not torch.allclose(per_image, fixed.expand_as(per_image), atol=1e-4)


def test_peak_region_and_uint8() -> None:
    values = np.zeros((20, 30), dtype=np.float32)
    values[5:9, 10:16] = 0.8
    values[6, 12] = 1.0
    values[15:18, 2:4] = 0.3  # below half the peak: not part of the region
    heatmap = cam.to_uint8(values)
    assert heatmap.dtype == np.uint8 and heatmap.max() == 255
    region = cam.peak_region(heatmap)
    assert (region.column0, region.row0, region.column1, region.row1) == (10, 5, 16, 9)
    assert region.polyline()[0] == region.polyline()[-1]


def test_ct_pipeline_heatmap_equals_reference_mapped_back(tmp_path: Path) -> None:
    """The CT pipeline's stored uint8 map = pytorch-grad-cam on the same input, un-letterboxed."""
    _, study = ct_study(tmp_path / "ct", n_slices=3)
    path, spec = ct_checkpoint(tmp_path)
    pipeline = get_pipeline("ct").load({"model": path}, "cpu", PredictOptions(max_explained=1))
    result = pipeline.predict(study)
    (explained,) = result.explanations
    series = read_series(study.series[0].series_instance_uid, study.series[0].paths)
    prep = spec.preprocessing
    assert isinstance(prep, CTPreprocessing)
    x, placement = ct_slice(series.decode(explained.position_index), prep, spec.input_size)
    model, _ = load_model(path)
    reference = _reference(model, torch.from_numpy(x)[None])[0]
    expected = cam.to_uint8(placement.to_source(reference))
    assert np.abs(explained.heatmap.astype(int) - expected.astype(int)).max() <= 1
