"""What the CT, MR and localiser protocols share: options, seeds, pretrained weights, the
binary classifier job, and the export of a trained network as a node checkpoint."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sijnode.errors import TrainingError
from sijnode.evaluation import roc_auc
from sijnode.models.architectures import build
from sijnode.models.spec import ModelSpec
from sijnode.training.engine import Device, Job, epoch_batches, predict, steps


@dataclass
class TrainOptions:
    """The options of ``sijnode train`` (one set for the three protocols)."""

    data: Path
    out: Path
    quick: bool = False
    device: str = "cpu"
    seed: int = 0
    pretrained: Path | None = None
    resume: bool = False
    quiet: bool = False
    epochs: int | None = None
    folds: int | None = None
    compare: bool = False
    size: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    whitening: bool = True
    body_crop: bool = True
    target_sensitivity: float | None = None
    stop_after: int | None = None
    max_subjects: int | None = None
    optimizer: str | None = None
    augment: bool = True

    def config(self, **resolved: Any) -> dict[str, Any]:
        values = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        values["data"] = str(Path(self.data).resolve())
        values.pop("out")
        return values | resolved


def job_seed(seed: int, name: str) -> int:
    """A job's seed from the run seed and the job name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_pretrained(model: nn.Module, path: Path | None, architecture: str) -> dict[str, int]:
    """Initialise from a local safetensors file of ImageNet weights (nothing downloaded).

    ``path`` is a file, or a folder holding ``<architecture>.safetensors``. Tensors whose
    name and shape match are copied; the heads (other shapes) stay as initialised.
    """
    if path is None:
        return {"copied": 0, "skipped": 0}
    from safetensors.torch import load_file

    file = path / f"{architecture}.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise TrainingError(
            f"--pretrained {path}: expected a safetensors file, found none at {file}"
        )
    try:
        weights = load_file(str(file))
    except (OSError, RuntimeError, ValueError) as exc:
        raise TrainingError(f"--pretrained {file}: not a safetensors file: {exc}") from exc
    own = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise TrainingError(
            f"--pretrained {file}: no tensor matches {architecture} by name and shape"
        )
    model.load_state_dict(matched, strict=False)
    return {"copied": len(matched), "skipped": len(own) - len(matched)}


def spec_model(spec: ModelSpec, pretrained: Path | None) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = build(spec)
        load_pretrained(model, pretrained, spec.architecture)
        return model

    return make


def pos_weight(labels: npt.NDArray[np.int64]) -> float:
    """Class balance (Fu et al. 2024: 254 against 576): ``n_negative / n_positive`` as the
    positive weight of the BCE loss, computed on the training images only."""
    positives = int(labels.sum())
    return float((len(labels) - positives) / max(positives, 1))


def classifier_job(
    name: str,
    seed: int,
    epochs: int,
    batch_size: int,
    build_model: Callable[[], nn.Module],
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_idx: npt.NDArray[np.int64],
    labels: npt.NDArray[np.int64],
    make_input: Callable[[npt.NDArray[np.int64], int], npt.NDArray[np.float32]],
    val_inputs: npt.NDArray[np.float32],
    val_labels: npt.NDArray[np.int64],
    device: Device,
) -> Job:
    """A binary classifier job; the best epoch has the highest validation ROC AUC, ties
    broken by the lower validation loss."""

    def make(chunk: npt.NDArray[np.int64], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = train_idx[chunk]
        x = torch.from_numpy(make_input(idx, epoch))
        return x, torch.from_numpy(labels[idx].astype(np.float32))

    def evaluate(model: nn.Module) -> dict[str, float]:
        p = predict_proba(model, val_inputs, device)
        y = val_labels.astype(np.float64)
        q = np.clip(p, 1e-6, 1 - 1e-6)
        val_loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))) if len(y) else 0.0
        auc = roc_auc(val_labels.astype(bool), p) if len(set(val_labels.tolist())) == 2 else 0.0
        accuracy = float(((p >= 0.5) == val_labels.astype(bool)).mean())
        return {
            "loss": val_loss,
            "auc": auc,
            "accuracy": accuracy,
            "score": auc - 1e-3 * min(val_loss, 10.0),
        }

    return Job(
        name=name,
        seed=seed,
        epochs=epochs,
        build=build_model,
        optimizer=optimizer,
        steps_per_epoch=steps(len(train_idx), batch_size),
        scheduler=lambda opt, total: cosine_with_floor(opt, total),
        loss=loss,
        batches=epoch_batches(len(train_idx), batch_size, seed, make),
        evaluate=evaluate,
    )


def cosine_with_floor(optimizer: torch.optim.Optimizer, total: int) -> Any:
    from sijnode.training.losses import cosine_schedule

    return cosine_schedule(optimizer, total)


def predict_proba(
    model: nn.Module, inputs: npt.NDArray[np.float32], device: Device
) -> npt.NDArray[np.float64]:
    """Sigmoid of the network's logit for each input (eval mode)."""
    logits = predict(model, inputs, device)[:, 0].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits))
