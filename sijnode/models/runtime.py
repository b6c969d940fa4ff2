"""A warm model on its device: precision, memory format, batched forward, CUDA OOM retry.

CPU runs fp32 in channels_last (measured faster for ResNeXt-50 on these CPUs, issue 10);
CUDA runs the spec's precision (bf16 by default for a bf16 spec) unless overridden. On a
CUDA out-of-memory error the batch is halved and retried; the smaller size is kept.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sijnode.errors import PipelineError
from sijnode.models.spec import ModelSpec

T = TypeVar("T")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r}: expected an available CUDA device, found none")
    if not (device == "cpu" or device.startswith("cuda")):
        raise PipelineError(f"device {device!r}: expected cpu, cuda, cuda:N or auto")
    return device


def resolve_precision(spec: ModelSpec, device: str, override: str | None) -> str:
    """fp32 on CPU; on CUDA the override or the spec's precision."""
    if not device.startswith("cuda"):
        return "fp32"
    precision = override or spec.precision
    if precision not in _DTYPES:
        raise PipelineError(f"precision {precision!r}: expected one of {sorted(_DTYPES)}")
    return precision


@dataclass
class StageTimes:
    """Seconds per stage; thread-safe (worker threads add decode and preprocess time)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def timed(self, stage: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.add(stage, time.perf_counter() - started)

    def result(self) -> dict[str, float]:
        stages = ("decode", "preprocess", "localise", "infer", "explain")
        return {s: round(self.seconds.get(s, 0.0), 6) for s in stages} | {
            k: round(v, 6) for k, v in self.seconds.items() if k not in stages
        }


class Runner:
    """One model, warm on its device, run in batches."""

    def __init__(
        self, model: nn.Module, spec: ModelSpec, device: str, precision: str, batch_size: int
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.memory_format = (
            torch.channels_last
            if spec.memory_format == "channels_last"
            else torch.contiguous_format
        )
        if device == "cpu":
            self.memory_format = torch.channels_last
        self.model = model.to(device=self.device, dtype=self.dtype).to(
            memory_format=self.memory_format
        )
        self.model.eval()
        self.batch_size = batch_size
        self.oom_retries = 0

    def tensor(self, batch: npt.NDArray[np.float32]) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)

    def run(self, batch: npt.NDArray[np.float32], fn: Callable[[torch.Tensor], T]) -> list[T]:
        """``fn`` on ``batch`` in chunks of ``batch_size``; halve and retry on CUDA OOM."""
        outputs: list[T] = []
        start = 0
        while start < len(batch):
            size = min(self.batch_size, len(batch) - start)
            try:
                with torch.inference_mode():
                    outputs.append(fn(self.tensor(batch[start : start + size])))
            except torch.cuda.OutOfMemoryError as exc:
                if size <= 1:
                    raise PipelineError(
                        f"CUDA out of memory at batch size 1 on {self.device}"
                    ) from exc
                torch.cuda.empty_cache()
                self.batch_size = max(1, size // 2)
                self.oom_retries += 1
                continue
            start += size
        return outputs
