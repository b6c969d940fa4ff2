"""Model checkpoints for the worker tests: small specs, seeded or tiny stand-in weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sijnode.models import spec as specs
from sijnode.models.spec import ModelSpec, OperatingPoints


def ct_spec(input_size: int = 64, **fields: Any) -> ModelSpec:
    """A CT slice classifier spec (ResNeXt-50) at a small input size, thresholds 0.5."""
    fields.setdefault("name", "test-ct")
    fields.setdefault("operating_points", OperatingPoints(slice_threshold=0.5, study_threshold=0.5))
    return specs.ct_spec(size=input_size, **fields)


def mr_spec(input_size: int = 64) -> ModelSpec:
    """An MR ROI classifier spec (ResNet18 with a hidden head)."""
    return specs.mr_spec(name="test-mr", size=input_size)


def localizer_spec(input_size: int = 64) -> ModelSpec:
    """An SI-joint localiser spec."""
    return specs.localizer_spec(name="test-localizer", size=input_size)


def tiny_checkpoint(path: Path, spec: ModelSpec, fill: float = 0.0) -> ModelSpec:
    """A valid checkpoint file whose weights do not fit the architecture (header tests)."""
    import torch

    from sijnode.models.checkpoint import save_checkpoint

    return save_checkpoint(path, spec, {"w": torch.full((4,), fill)})


def zero_checkpoint(path: Path, spec: ModelSpec, fill: float = 0.0) -> ModelSpec:
    """A checkpoint whose tensors fit the spec's architecture (names and shapes), every
    value ``fill``: cheap to make, passes ``sijnode models import`` (CLI tests)."""
    import torch

    from sijnode.models.checkpoint import network_shapes, save_checkpoint

    state = {name: torch.full(shape, fill) for name, shape in network_shapes(spec).items()}
    return save_checkpoint(path, spec, state)


def seeded_checkpoint(path: Path, spec: ModelSpec, seed: int = 7) -> ModelSpec:
    """A checkpoint with seeded random weights of the spec's architecture."""
    from sijnode.models.architectures import seeded_state_dict
    from sijnode.models.checkpoint import save_checkpoint

    return save_checkpoint(path, spec, seeded_state_dict(spec, seed))
