"""Model checkpoints for tests: valid specs, seeded weights, tiny stand-in weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sijnode.models.spec import (
    Aggregation,
    CTPreprocessing,
    LocalizerPreprocessing,
    ModelSpec,
    MRPreprocessing,
    OperatingPoints,
)


def ct_spec(input_size: int = 64, **update: Any) -> ModelSpec:
    """A CT slice classifier spec (ResNeXt-50) at a small input size."""
    spec = ModelSpec(
        task="ct_slice_classifier",
        name="test-ct",
        architecture="resnext50_32x4d",
        input_size=(input_size, input_size),
        preprocessing=CTPreprocessing(),
        operating_points=OperatingPoints(slice_threshold=0.5, study_threshold=0.5),
        aggregation=Aggregation(rule="median_topk_mean"),
        classes={"0": "absent", "1": "sacroiliitis"},
    )
    return ModelSpec.model_validate({**spec.model_dump(mode="json"), **update})


def mr_spec(input_size: int = 64) -> ModelSpec:
    """An MR ROI classifier spec (ResNet18 with a hidden head)."""
    return ModelSpec(
        task="mr_roi_classifier",
        name="test-mr",
        architecture="resnet18_hidden_head",
        input_size=(input_size, input_size),
        preprocessing=MRPreprocessing(patch_size=input_size),
        operating_points=OperatingPoints(slice_threshold=0.5, subject_threshold=0.5),
        aggregation=Aggregation(rule="median_decisions_mean"),
        classes={"0": "absent", "1": "active sacroiliitis"},
    )


def localizer_spec(input_size: int = 64) -> ModelSpec:
    """An SI-joint localiser spec."""
    return ModelSpec(
        task="si_joint_localizer",
        name="test-localizer",
        architecture="localizer_cnn_v1",
        input_size=(input_size, input_size),
        preprocessing=LocalizerPreprocessing(),
        aggregation=Aggregation(rule="none"),
        classes={"0": "left ilium box", "1": "right ilium box"},
    )


def tiny_checkpoint(path: Path, spec: ModelSpec, fill: float = 0.0) -> ModelSpec:
    """A valid checkpoint file whose weights do not fit the architecture (header tests)."""
    import torch

    from sijnode.models.checkpoint import save_checkpoint

    return save_checkpoint(path, spec, {"w": torch.full((4,), fill)})


def seeded_checkpoint(path: Path, spec: ModelSpec, seed: int = 7) -> ModelSpec:
    """A checkpoint with seeded random weights of the spec's architecture."""
    from sijnode.models.architectures import seeded_state_dict
    from sijnode.models.checkpoint import save_checkpoint

    return save_checkpoint(path, spec, seeded_state_dict(spec, seed))
