"""One file per model: safetensors weights with the spec as JSON in the metadata header.

Layout (safetensors): 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(tensor names, dtypes, shapes, data offsets, and ``__metadata__``), then the data section.
The spec lives in ``__metadata__["sijnode.spec"]``; ``weights_sha256`` is the SHA-256 of the
data section (the bytes after the header), so the spec can name its own weights. No pickle:
``torch.load`` of a foreign file can run code, safetensors cannot.

``read_spec`` and ``verify_checkpoint`` import no torch (the listener uses them);
``load_model`` builds the network on the meta device and assigns the weights.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from sijnode.errors import CheckpointError
from sijnode.models.spec import ARCHITECTURE_TASKS, ModelSpec

if TYPE_CHECKING:
    import torch

SPEC_KEY = "sijnode.spec"
#: A header larger than this is not a model checkpoint (safetensors itself caps at 100 MB).
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed JSON header, the data section's offset and the file size."""
    try:
        with path.open("rb") as fh:
            size = path.stat().st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path.name}: truncated file: expected an 8-byte safetensors header "
                    f"length, found {len(prefix)} bytes"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(
                    f"{path.name}: truncated or not a safetensors file: header of {length} "
                    f"bytes declared, file has {size} bytes"
                )
            raw = fh.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name}: the safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object header, found {type(header)}")
    return header, 8 + length, size


def _spec_from_header(path: Path, header: dict[str, Any]) -> ModelSpec:
    metadata = header.get("__metadata__") or {}
    text = metadata.get(SPEC_KEY) if isinstance(metadata, dict) else None
    if text is None:
        raise CheckpointError(
            f"{path.name}: invalid spec: expected metadata key {SPEC_KEY!r}, found keys "
            f"{sorted(metadata) if isinstance(metadata, dict) else metadata!r}"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path.name}: invalid spec: not JSON: {exc}") from exc
    architecture = raw.get("architecture") if isinstance(raw, dict) else None
    if architecture is not None and architecture not in ARCHITECTURE_TASKS:
        raise CheckpointError(
            f"{path.name}: unknown architecture {architecture!r}: expected one of "
            f"{sorted(ARCHITECTURE_TASKS)}"
        )
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path.name}: invalid spec: {exc}") from exc


def read_spec(path: Path | str) -> ModelSpec:
    """The spec stored in a checkpoint's header; reads only the header (no torch)."""
    path = Path(path)
    header, _, _ = _read_header(path)
    return _spec_from_header(path, header)


def _data_end(path: Path, header: dict[str, Any]) -> int:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise CheckpointError(f"{path.name}: tensor {name!r} has no valid data_offsets")
        end = max(end, int(offsets[1]))
    return end


def _sha256_range(path: Path, start: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(start)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: Path | str, expected_task: str | None = None) -> ModelSpec:
    """Check a checkpoint fully (no torch) and return its spec.

    Raises :class:`CheckpointError` naming the reason: truncated file, weights hash
    mismatch (tampered), unknown architecture, wrong task, or an invalid spec.
    """
    path = Path(path)
    header, data_start, size = _read_header(path)
    spec = _spec_from_header(path, header)
    data_end = _data_end(path, header)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{path.name}: truncated file: the header declares {data_end} bytes of weights, "
            f"found {size - data_start}"
        )
    if data_start + data_end < size:
        raise CheckpointError(
            f"{path.name}: corrupt file: the header declares {data_end} bytes of weights, "
            f"found {size - data_start} (trailing bytes)"
        )
    if expected_task is not None and spec.task != expected_task:
        raise CheckpointError(
            f"{path.name}: wrong task: expected a {expected_task!r} model, found "
            f"{spec.task!r} ({spec.name}, {spec.version})"
        )
    found = _sha256_range(path, data_start)
    if found != spec.weights_sha256:
        raise CheckpointError(
            f"{path.name}: weights hash mismatch (tampered or corrupt): the spec expects "
            f"sha256 {spec.weights_sha256 or '(none)'}, the weights hash to {found}"
        )
    return spec


def save_checkpoint(
    path: Path | str, spec: ModelSpec, state_dict: Mapping[str, torch.Tensor]
) -> ModelSpec:
    """Write ``state_dict`` and ``spec`` to ``path``; return the spec with its weights hash."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    blob = save(tensors)
    (length,) = struct.unpack("<Q", blob[:8])
    sha = hashlib.sha256(blob[8 + length :]).hexdigest()
    final = spec.with_weights(sha)
    blob = save(tensors, metadata={SPEC_KEY: final.canonical_json()})
    (length,) = struct.unpack("<Q", blob[:8])
    if hashlib.sha256(blob[8 + length :]).hexdigest() != sha:
        raise CheckpointError("safetensors wrote a different data section with metadata")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return final


def load_model(
    path: Path | str, device: str = "cpu", expected_task: str | None = None
) -> tuple[torch.nn.Module, ModelSpec]:
    """Verify, build on the meta device, assign the weights; eval mode and memory format."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sijnode.models.architectures import build

    path = Path(path)
    spec = verify_checkpoint(path, expected_task)
    with torch.device("meta"):
        model = build(spec)
    try:
        state = load_file(str(path), device=str(device))
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path.name}: the weights do not fit architecture {spec.architecture!r}: {exc}"
        ) from exc
    model.eval()
    if spec.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model, spec
