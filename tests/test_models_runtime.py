"""The runtime: CUDA out-of-memory halves the batch and retries (error injection), devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sijnode.errors import PipelineError
from sijnode.models.architectures import build, seeded_state_dict
from sijnode.models.runtime import Runner, StageTimes, resolve_device, resolve_precision
from sijnode.models.series import batched, prefetch
from sijnode.models.spec import localizer_spec


@pytest.fixture
def runner() -> Runner:
    torch.set_num_threads(1)
    spec = localizer_spec(size=32)
    model = build(spec)
    model.load_state_dict(seeded_state_dict(spec, 1))
    return Runner(model, spec, "cpu", "fp32", batch_size=8)


def test_out_of_memory_halves_the_batch_and_retries(runner: Runner) -> None:
    x = np.random.default_rng(0).standard_normal((11, 1, 32, 32)).astype(np.float32)
    seen: list[int] = []

    def forward(t: torch.Tensor) -> np.ndarray:
        seen.append(len(t))
        if len(t) > 2:  # injected failure: this "device" holds at most 2 images
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return runner.model(t).numpy()

    out = np.concatenate(runner.run(x, forward))
    with torch.inference_mode():
        expected = runner.model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-6)
    assert runner.batch_size == 2 and runner.oom_retries == 2
    assert seen[:3] == [8, 4, 2] and sum(n for n in seen if n <= 2) == 11


def test_out_of_memory_at_batch_one_is_an_error(runner: Runner) -> None:
    def forward(t: torch.Tensor) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(PipelineError, match="out of memory at batch size 1"):
        runner.run(np.zeros((3, 1, 32, 32), np.float32), forward)


def test_devices_and_precision() -> None:
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(PipelineError, match="expected cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(PipelineError, match="expected an available CUDA device"):
            resolve_device("cuda:0")
    spec = localizer_spec().model_copy(update={"precision": "bf16"})
    assert resolve_precision(spec, "cpu", None) == "fp32"
    assert resolve_precision(spec, "cuda", None) == "bf16"
    assert resolve_precision(spec, "cuda", "fp16") == "fp16"


def test_prefetch_keeps_order_and_bounds_lookahead() -> None:
    started: list[int] = []

    def work(i: int) -> int:
        started.append(i)
        return i * i

    feed = prefetch(range(20), work, threads=2, ahead=3)
    first = next(feed)
    assert first == 0 and len(started) <= 4
    assert [first, *feed] == [i * i for i in range(20)]
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]
    times = StageTimes()
    times.add("decode", 0.5)
    assert times.result()["decode"] == 0.5 and times.result()["infer"] == 0.0
