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
    verify_checkpoint(path)  # the file itself is intact
    with pytest.raises(CheckpointError, match="do not fit architecture"):
        load_model(path)
