"""One training job (one network on one split): epochs, model selection, resumable state.

Determinism: the network is initialised from the job seed, the batch order of epoch ``e``
is a permutation drawn from ``(seed, e)`` and the augmentation of epoch ``e`` is seeded
from ``(seed, e)``, all in the main process. After every epoch the whole state is written
(``state/<job>.safetensors`` for tensors: model, best model, optimizer; ``state/<job>.json``
for the rest: epoch, history, scheduler, RNG states), so an interrupted job resumes at the
next epoch and gives the same weights as an uninterrupted one on CPU. No pickle.

CUDA runs under ``torch.autocast`` (bf16 where supported, else fp16 with a gradient
scaler); CPU runs fp32. Model and batches are channels_last on both.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sijnode.errors import TrainingError

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class Job:
    """What to train and how: everything but the data is in here."""

    name: str
    seed: int
    epochs: int
    build: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    #: Steps per epoch (for the cosine schedule over all steps).
    steps_per_epoch: int
    scheduler: Callable[[torch.optim.Optimizer, int], Any]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: Training batches of one epoch (deterministic for a given epoch).
    batches: Batches
    #: Validation metrics of the current model; ``score`` selects the best epoch.
    evaluate: Evaluate


@dataclass
class JobResult:
    name: str
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    best_state: dict[str, torch.Tensor] = field(repr=False)
    model: nn.Module = field(repr=False)


class Interrupted(TrainingError):
    """Training stopped on request after N epochs (tests of ``--resume``)."""


@dataclass
class Device:
    """Where and how a job runs."""

    name: str = "cpu"
    quiet: bool = False
    #: Stop the process after this many epochs in total (simulates an interruption).
    stop_after: int | None = None
    epochs_run: int = 0

    @property
    def cuda(self) -> bool:
        return self.name.startswith("cuda")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if not self.cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def autocast(self) -> Any:
        dtype = self.amp_dtype
        if dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.name, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def resolve_training_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {device}: expected an available CUDA device, found none")
    if device != "cpu" and not device.startswith("cuda"):
        raise TrainingError(f"--device {device}: expected cpu, cuda or cuda:N")
    return device


def predict(
    model: nn.Module, inputs: npt.NDArray[np.float32], device: Device, batch_size: int = 64
) -> npt.NDArray[np.float32]:
    """Model outputs (sigmoid of the logit, or the localiser's boxes) in eval mode."""
    model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            x = device.to_input(torch.from_numpy(inputs[start : start + batch_size]))
            with device.autocast():
                y = model(x)
            outs.append(y.float().reshape(len(x), -1).cpu().numpy())
    out = np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)
    return out


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                plain[key] = value
        rest["state"][str(pid)] = plain
    return tensors, rest


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def save_state(
    directory: Path,
    job: Job,
    epoch: int,
    model: nn.Module,
    best: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
    best_epoch: int,
    best_score: float,
) -> None:
    """The whole state after ``epoch`` (atomic: tensors first, then the JSON that names it)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in best.items()}
    tensors |= opt_tensors
    tensors["rng.torch"] = torch.get_rng_state()
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    tmp = directory / f"{job.name}.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / f"{job.name}.safetensors")
    record = {
        "job": job.name,
        "epoch": epoch,
        "seed": job.seed,
        "history": history,
        "best_epoch": best_epoch,
        "best_score": best_score,
        "optimizer": opt_rest,
        "scheduler": scheduler.state_dict(),
    }
    tmp_json = directory / f"{job.name}.json.tmp"
    tmp_json.write_text(json.dumps(_jsonable(record), indent=1))
    tmp_json.replace(directory / f"{job.name}.json")


def _load_state(
    directory: Path, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    from safetensors.torch import load_file

    path = directory / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return tensors, record


def fit(job: Job, device: Device, state_dir: Path, resume: bool = False) -> JobResult:
    """Train ``job`` for its epochs, keeping the epoch with the best validation ``score``."""
    from tqdm.auto import tqdm

    torch.manual_seed(job.seed)
    model = job.build().to(device.name).to(memory_format=torch.channels_last)
    optimizer = job.optimizer(model)
    scheduler = job.scheduler(optimizer, job.epochs * job.steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=device.amp_dtype is torch.float16)
    history: list[dict[str, float]] = []
    best: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_epoch, best_score, start = 0, -math.inf, 1
    loaded = _load_state(state_dir, job.name) if resume else None
    if loaded is not None:
        tensors, record = loaded
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        optimizer.load_state_dict(_join_optimizer(tensors, record["optimizer"]))
        scheduler.load_state_dict(record["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        history = record["history"]
        best_epoch = int(record["best_epoch"])
        best_score = -math.inf if record["best_score"] is None else float(record["best_score"])
        start = int(record["epoch"]) + 1
    for epoch in range(start, job.epochs + 1):
        if device.stop_after is not None and device.epochs_run >= device.stop_after:
            raise Interrupted(f"stopped after {device.epochs_run} epoch(s) as asked (--stop-after)")
        started = time.perf_counter()
        model.train()
        total, count = 0.0, 0
        bar = tqdm(
            job.batches(epoch),
            total=job.steps_per_epoch,
            desc=f"{job.name} epoch {epoch}/{job.epochs}",
            disable=device.quiet,
            leave=False,
            dynamic_ncols=True,
        )
        for x, y in bar:
            x, y = device.to_input(x), y.to(device.name)
            optimizer.zero_grad(set_to_none=True)
            with device.autocast():
                out = model(x)
            loss = job.loss(out.float().reshape(y.shape[0], -1).squeeze(-1), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        metrics = job.evaluate(model)
        entry = {"epoch": epoch, "train_loss": total / max(count, 1)} | {
            f"val_{k}": float(v) for k, v in metrics.items()
        }
        entry["lr"] = float(optimizer.param_groups[0]["lr"])
        entry["seconds"] = round(time.perf_counter() - started, 3)
        history.append(entry)
        score = float(metrics["score"])
        if math.isfinite(score) and score > best_score:
            best_score, best_epoch = score, epoch
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not device.quiet:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            tqdm.write(
                f"{job.name} epoch {epoch}/{job.epochs}: loss={entry['train_loss']:.4f} {shown}"
            )
        save_state(
            state_dir,
            job,
            epoch,
            model,
            best,
            optimizer,
            scheduler,
            history,
            best_epoch,
            best_score,
        )
        device.epochs_run += 1
    model.load_state_dict(best)
    model.eval()
    return JobResult(job.name, best_epoch, best_score, history, best, model)


def cleanup_state(state_dir: Path, name: str) -> None:
    for suffix in (".safetensors", ".json"):
        (state_dir / f"{name}{suffix}").unlink(missing_ok=True)


def epoch_batches(
    n: int,
    batch_size: int,
    seed: int,
    make: Callable[[npt.NDArray[np.int64], int], tuple[torch.Tensor, torch.Tensor]],
    weights: npt.NDArray[np.float64] | None = None,
) -> Batches:
    """Epoch ``e``: a permutation (or a weighted draw) seeded by ``(seed, e)``, in batches."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        if weights is None:
            order = rng.permutation(n)
        else:
            order = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
        for start in range(0, n - (n % batch_size if n > batch_size else 0), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < 2:
                break
            yield make(chunk, epoch)

    return batches


def steps(n: int, batch_size: int) -> int:
    """Batches per epoch of :func:`epoch_batches` (the last partial batch is dropped)."""
    if n <= batch_size:
        return 1 if n >= 2 else 0
    return n // batch_size
