"""Shared helpers of the model tests: synthetic studies on disk, seeded checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sijnode.models.architectures import fixed_box_localizer_state, seeded_state_dict
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.registry import StudyInput
from sijnode.models.spec import ModelSpec, ct_spec, localizer_spec, mr_spec
from sijnode.synth import SynthStudy, generate_ct_study, generate_mr_study, write_study

#: Logit gains of the seeded heads: spread random-weight probabilities over (0, 1).
CT_HEAD_GAIN = 60.0
MR_HEAD_GAIN = 8.0


def study_input(study: SynthStudy, out: Path) -> StudyInput:
    """Write ``study`` under ``out`` and describe it as a pipeline input."""
    folder = write_study(study, out)
    paths = sorted(Path(folder).glob("*.dcm"))
    return StudyInput.from_paths(study.study_instance_uid, {study.series_instance_uid: paths})


def ct_study(out: Path, n_slices: int = 6, seed: int = 3) -> tuple[SynthStudy, StudyInput]:
    study = generate_ct_study(
        seed=seed, subject_index=1, positive=True, side="left", n_slices=n_slices
    )
    return study, study_input(study, out)


def mr_study(out: Path, n_slices: int = 6, seed: int = 3) -> tuple[SynthStudy, StudyInput]:
    study = generate_mr_study(
        seed=seed, subject_index=1, positive=True, side="both", n_slices=n_slices
    )
    return study, study_input(study, out)


def _gain(state: dict[str, torch.Tensor], key: str, gain: float) -> dict[str, torch.Tensor]:
    state[key] = state[key] * gain
    return state


def ct_checkpoint(
    out: Path, size: int = 64, seed: int = 5, **fields: object
) -> tuple[Path, ModelSpec]:
    spec = ct_spec(size=size, **fields)
    path = out / "ct.safetensors"
    spec = save_checkpoint(
        path, spec, _gain(seeded_state_dict(spec, seed), "fc.weight", CT_HEAD_GAIN)
    )
    return path, spec


def mr_checkpoint(
    out: Path, size: int = 64, seed: int = 5, noise: bool = True, **fields: object
) -> tuple[Path, ModelSpec]:
    prep = {"kind": "mr", "patch_size": size, "noise": {"enabled": noise}}
    spec = mr_spec(size=size, preprocessing=prep, **fields)
    path = out / "mr.safetensors"
    spec = save_checkpoint(
        path, spec, _gain(seeded_state_dict(spec, seed), "fc.2.weight", MR_HEAD_GAIN)
    )
    return path, spec


def truth_boxes(study: SynthStudy) -> tuple[float, ...]:
    """Mean truth iliac boxes of an MR study, normalised (image-left box first)."""
    rows, columns = int(study.datasets[0].Rows), int(study.datasets[0].Columns)
    rois = [r for s in study.slices for r in s.rois]
    out: list[float] = []
    # Patient right ilium is on the image's left (row direction +x, docs/synth.md).
    for side in ("right", "left"):
        b = np.array([[r.x0, r.y0, r.x1, r.y1] for r in rois if r.side == side], dtype=float)
        x0, y0, x1, y1 = b.mean(axis=0)
        out += [x0 / columns, y0 / rows, x1 / columns, y1 / rows]
    return tuple(out)


def localizer_checkpoint(
    out: Path, boxes: tuple[float, ...] | None = None, size: int = 64, seed: int = 1
) -> tuple[Path, ModelSpec]:
    """A localiser that predicts ``boxes`` on every slice, or seeded random weights."""
    spec = localizer_spec(size=size)
    path = out / "localizer.safetensors"
    state = (
        seeded_state_dict(spec, seed)
        if boxes is None
        else fixed_box_localizer_state(spec, boxes, seed)
    )
    return path, save_checkpoint(path, spec, state)
