"""Model specs and checkpoints: version, round trip, and every refusal case."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from sijnode.errors import CheckpointError
from sijnode.models.architectures import seeded_state_dict
from sijnode.models.checkpoint import (
    SPEC_KEY,
    load_model,
    read_spec,
    save_checkpoint,
    verify_checkpoint,
    weights_misfit,
)
from sijnode.models.spec import ModelSpec, ct_spec, localizer_spec, mr_spec


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, ModelSpec]:
    spec = localizer_spec(size=64)
    path = tmp_path / "loc.safetensors"
    return path, save_checkpoint(path, spec, seeded_state_dict(spec, 1))


def test_spec_is_frozen_and_versioned() -> None:
    spec = ct_spec()
    with pytest.raises(Exception, match="frozen"):
        spec.name = "other"  # type: ignore[misc]
    assert spec.version.startswith("ct-") and len(spec.version) == 15
    assert ct_spec().version == spec.version  # deterministic
    # A new threshold is a new version; so are new weights.
    assert spec.with_thresholds(study_threshold=0.7).version != spec.version
    assert spec.with_weights("a" * 64).version != spec.version
    assert ModelSpec.model_validate_json(spec.canonical_json()) == spec
    assert mr_spec().version.startswith("mr-") and localizer_spec().version.startswith("loc-")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "vgg99"}, "unknown architecture"),
        ({"architecture": "resnet18_hidden_head"}, "serves"),
        ({"operating_points": {"slice_threshold": 0.5}}, "study_threshold is required"),
        ({"operating_points": {"slice_threshold": 1.5, "study_threshold": 0.5}}, "less than"),
        ({"aggregation": {"rule": "median_topk_mean", "median_size": 2}}, "odd"),
        ({"preprocessing": {"kind": "ct", "mean": [0.5], "std": [0.2]}}, "3 values"),
        ({"preprocessing": {"kind": "mr"}}, "preprocessing kind"),
        ({"training": {"x": float("nan")}}, "JSON"),
        ({"weights_sha256": "xyz"}, "64 lowercase hex"),
    ],
)
def test_spec_validation(change: dict[str, object], message: str) -> None:
    raw = ct_spec().model_dump(mode="json") | change
    with pytest.raises(ValueError, match=message):
        ModelSpec.model_validate(raw)


def test_mr_input_size_is_the_patch_size() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        mr_spec(size=224, input_size=(112, 112))


def test_round_trip_and_load(checkpoint: tuple[Path, ModelSpec]) -> None:
    path, spec = checkpoint
    assert len(spec.weights_sha256) == 64
    assert read_spec(path) == spec
    assert verify_checkpoint(path, "si_joint_localizer") == spec
    model, loaded = load_model(path, "cpu", "si_joint_localizer")
    assert loaded == spec and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    reference = seeded_state_dict(spec, 1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_read_spec_and_verify_import_no_torch(checkpoint: tuple[Path, ModelSpec]) -> None:
    path, spec = checkpoint
    code = (
        "import sys\n"
        "from sijnode.models.checkpoint import read_spec, verify_checkpoint\n"
        "from sijnode.models.registry import get_pipeline, pipeline_names\n"
        f"s = verify_checkpoint({str(path)!r})\n"
        f"assert read_spec({str(path)!r}).version == s.version == {spec.version!r}\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tampered_weights_refused(checkpoint: tuple[Path, ModelSpec]) -> None:
    path, _ = checkpoint
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights hash mismatch"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights hash mismatch"):
        load_model(path)


def test_wrong_task_refused(checkpoint: tuple[Path, ModelSpec]) -> None:
    path, _ = checkpoint
    with pytest.raises(CheckpointError, match=r"wrong task.*'ct_slice_classifier'"):
        verify_checkpoint(path, "ct_slice_classifier")
    with pytest.raises(CheckpointError, match="wrong task"):
        load_model(path, "cpu", "mr_roi_classifier")


@pytest.mark.parametrize("keep", [0, 5, 20, -100])
def test_truncated_file_refused(checkpoint: tuple[Path, ModelSpec], keep: int) -> None:
    path, _ = checkpoint
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(path)


def test_trailing_bytes_refused(checkpoint: tuple[Path, ModelSpec]) -> None:
    path, _ = checkpoint
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        verify_checkpoint(path)


def _forged(path: Path, spec_json: str | None) -> Path:
    metadata = {SPEC_KEY: spec_json} if spec_json is not None else {"other": "x"}
    path.write_bytes(save({"w": torch.zeros(2)}, metadata=metadata))
    return path


def test_unknown_architecture_refused(tmp_path: Path) -> None:
    raw = localizer_spec().model_dump(mode="json") | {"architecture": "vgg99"}
    path = _forged(tmp_path / "x.safetensors", json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown architecture 'vgg99'"):
        read_spec(path)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        verify_checkpoint(path)


@pytest.mark.parametrize(
    ("spec_json", "message"),
    [
        (None, "expected metadata key 'sijnode.spec'"),
        ("{not json", "not JSON"),
        ("{}", "invalid spec"),
    ],
)
def test_invalid_spec_refused(tmp_path: Path, spec_json: str | None, message: str) -> None:
    path = _forged(tmp_path / "x.safetensors", spec_json)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(path)


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"abcd")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_spec(path)


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path) -> None:
    spec = localizer_spec(size=64)
    path = tmp_path / "bad.safetensors"
    save_checkpoint(path, spec, {"features.0.weight": torch.zeros(3, 3)})
    verify_checkpoint(path)  # the file itself is intact (header checks, no torch)
    with pytest.raises(CheckpointError, match="do not fit architecture") as refused:
        verify_checkpoint(path, fit=True)  # built on the meta device: the tensors differ
    assert "missing: features.1.bias" in str(refused.value)
    assert "1 of another shape: features.0.weight [3, 3] (expected [16, 1, 3, 3])" in str(
        refused.value
    )
    with pytest.raises(CheckpointError, match="do not fit architecture") as refused:
        load_model(path)
    assert "features.0.weight [3, 3]" in str(refused.value)


def test_a_comparison_architecture_over_other_weights_is_refused(tmp_path: Path) -> None:
    """A spec that names vgg16 over a localiser's weights: verify with ``fit`` refuses and
    says which tensors differ; the same weights under their own spec pass."""
    loc = localizer_spec(size=64)
    state = seeded_state_dict(loc, 1)
    path = tmp_path / "vgg.safetensors"
    save_checkpoint(path, ct_spec(name="ct-vgg16", architecture="vgg16"), state)
    verify_checkpoint(path, "ct_slice_classifier")  # hash, length, task: all fine
    with pytest.raises(CheckpointError) as refused:
        verify_checkpoint(path, "ct_slice_classifier", fit=True)
    message = str(refused.value)
    assert "the weights do not fit architecture 'vgg16'" in message
    assert "missing: classifier.0.bias" in message
    assert "unexpected: features.0.weight" not in message  # vgg16 has it too: other shape
    assert "of another shape: features.0.weight [16, 1, 3, 3] (expected [64, 3, 3, 3])" in message
    assert "unexpected: features.1.bias" in message  # a batch norm: vgg16 has none
    own = tmp_path / "loc.safetensors"
    save_checkpoint(own, loc, state)
    assert verify_checkpoint(own, fit=True).architecture == "localizer_cnn_v1"


def test_weights_misfit_lists_a_few_names_then_a_count() -> None:
    expected = {f"t{i:02d}": (2,) for i in range(12)}
    assert weights_misfit(expected, dict(expected)) is None
    text = weights_misfit(expected, {"t00": (3,), "extra": (1,)}) or ""
    assert text.startswith("11 missing: t01, t02, t03, t04, t05, t06, t07, t08 (+3 more)")
    assert "1 unexpected: extra" in text and "1 of another shape: t00 [3] (expected [2])" in text
