"""One file per model: safetensors weights with the spec as JSON in the metadata header.

Layout (safetensors): 8-byte little-endian header length ``N``, ``N`` bytes of JSON header
(tensor names, dtypes, shapes, data offsets, and ``__metadata__``), then the data section.
The spec lives in ``__metadata__["sijnode.spec"]``; ``weights_sha256`` is the SHA-256 of the
data section (the bytes after the header), so the spec can name its own weights. No pickle:
``torch.load`` of a foreign file can run code, safetensors cannot.

``read_spec`` and ``verify_checkpoint`` import no torch (the listener uses them);
``verify_checkpoint(..., fit=True)`` (``sijnode models import|verify``) also builds the
architecture the spec names on the meta device (no memory for weights) and checks that the
file's tensor names and shapes are the network's (:func:`check_weights_fit`);
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


#: At most this many tensor names per kind of difference in a refusal message.
_SHOWN_TENSORS = 8


def _shapes_of_header(header: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, as the safetensors header declares them."""
    return {
        name: tuple(int(n) for n in entry.get("shape", ()))
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    }


def weights_misfit(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Which tensors differ between a network's state dict and a file, or None if none.

    ``expected`` and ``found`` map tensor names to shapes; the text names the missing,
    the unexpected and the misshapen tensors (a few of each, then a count).
    """

    def listed(names: list[str]) -> str:
        more = len(names) - _SHOWN_TENSORS
        return ", ".join(names[:_SHOWN_TENSORS]) + (f" (+{more} more)" if more > 0 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(
        f"{name} {list(found[name])} (expected {list(shape)})"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    )
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {listed(unexpected)}")
    if misshapen:
        parts.append(f"{len(misshapen)} of another shape: {listed(misshapen)}")
    return "; ".join(parts) or None


def network_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the untrained network the spec names, built on meta."""
    import torch

    from sijnode.models.architectures import build

    with torch.device("meta"):
        model = build(spec)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_weights_fit(path: Path | str, spec: ModelSpec | None = None) -> None:
    """Refuse a checkpoint whose tensors are not those of the architecture its spec names.

    Builds the network on the meta device (torch, no memory for weights) and compares its
    state dict's names and shapes with the file's header; :class:`CheckpointError` names
    the tensors that differ.
    """
    path = Path(path)
    header, _, _ = _read_header(path)
    if spec is None:
        spec = _spec_from_header(path, header)
    _refuse_misfit(path, spec, network_shapes(spec), _shapes_of_header(header))


def _refuse_misfit(
    path: Path,
    spec: ModelSpec,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
) -> None:
    problem = weights_misfit(expected, found)
    if problem is not None:
        raise CheckpointError(
            f"{path.name}: the weights do not fit architecture {spec.architecture!r}: {problem}"
        )


def verify_checkpoint(
    path: Path | str, expected_task: str | None = None, *, fit: bool = False
) -> ModelSpec:
    """Check a checkpoint fully and return its spec.

    Raises :class:`CheckpointError` naming the reason: truncated file, weights hash
    mismatch (tampered), unknown architecture, wrong task, or an invalid spec; with
    ``fit``, also weights that do not fit the architecture (:func:`check_weights_fit`,
    which imports torch; without it nothing here does).
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
    if fit:
        check_weights_fit(path, spec)
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
        _refuse_misfit(
            path,
            spec,
            {name: tuple(t.shape) for name, t in model.state_dict().items()},
            {name: tuple(t.shape) for name, t in state.items()},
        )
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, OSError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path.name}: the weights do not fit architecture {spec.architecture!r}: {exc}"
        ) from exc
    model.eval()
    if spec.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model, spec
