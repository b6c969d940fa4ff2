"""Inference benchmark: the whole pipeline path against the bare model on ready tensors.

For each pipeline (CT: ResNeXt-50 32x4d; MR: ResNet18 on ROI patches), one synthetic study
is written to disk (``sijnode.synth``) and a checkpoint with seeded weights is saved
(slice threshold 0, so every slice is positive and ``max_explained`` slices are explained; an MR
localiser that predicts the study's mean truth boxes). Then, in interleaved rounds:

- **pipeline**: ``LoadedPipeline.predict(study)`` (decode, preprocess, localise, forward,
  closed-form Grad-CAM, mapping back): classified slices per second of wall time;
- **bare**: ``model(x)`` on ready tensors of the same number of slices, with the same
  batch size, threads, memory format and precision;
- **ratio** pipeline / bare (target >= 0.8), and the **explanation cost** per explained
  slice as a fraction of one slice's forward (target <= 0.1).

``--gpu`` adds, where CUDA is present, the bare ResNeXt-50 in bf16 channels_last at batch
256 (images/s; target >= 10,000 on an H100-class GPU) and the CT pipeline's ratio to it.

    .venv/bin/python bench/inference.py --rounds 3                 # CPU, full size
    .venv/bin/python bench/inference.py --rounds 1 --size 64 --ct-slices 6 --mr-slices 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sijnode.models.architectures import (
    build,
    fixed_box_localizer_state,
    seeded_state_dict,
)
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.registry import LoadedPipeline, PredictOptions, StudyInput, get_pipeline
from sijnode.models.spec import ModelSpec, OperatingPoints, ct_spec, localizer_spec, mr_spec
from sijnode.synth import SynthStudy, generate_ct_study, generate_mr_study, write_study

#: Slice threshold 0: every slice is positive, so ``max_explained`` slices are explained
#: (the costly case) whatever the seeded weights score.
EVERY_SLICE = OperatingPoints(slice_threshold=0.0, chosen_by="bench: every slice", data="none")


@dataclass
class Figures:
    """Per-round figures of one pipeline."""

    pipeline: str
    slices: int = 0
    explained: int = 0
    pipeline_rate: list[float] = field(default_factory=list)
    bare_rate: list[float] = field(default_factory=list)
    ratio: list[float] = field(default_factory=list)
    explain_fraction: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        med = statistics.median
        return {
            "pipeline": self.pipeline,
            "slices": self.slices,
            "explained": self.explained,
            "pipeline_slices_per_s": round(med(self.pipeline_rate), 2),
            "bare_slices_per_s": round(med(self.bare_rate), 2),
            "ratio": round(med(self.ratio), 3),
            "ratio_range": [round(min(self.ratio), 3), round(max(self.ratio), 3)],
            "explain_fraction_of_forward": round(med(self.explain_fraction), 4),
            "stage_seconds": {k: round(med(s[k] for s in self.stages), 4) for k in self.stages[0]},
        }


def _study_input(study: SynthStudy, out: Path) -> StudyInput:
    folder = write_study(study, out)
    paths = sorted(Path(folder).glob("*.dcm"))
    return StudyInput.from_paths(study.study_instance_uid, {study.series_instance_uid: paths})


def _checkpoint(out: Path, spec: ModelSpec) -> tuple[Path, ModelSpec]:
    state = seeded_state_dict(spec, 5)
    path = out / f"{spec.short_task}.safetensors"
    return path, save_checkpoint(path, spec, state)


def _truth_boxes(study: SynthStudy) -> tuple[float, ...]:
    rows, columns = int(study.datasets[0].Rows), int(study.datasets[0].Columns)
    rois = [r for s in study.slices for r in s.rois]
    out: list[float] = []
    for side in ("right", "left"):  # patient right ilium is on the image's left
        b = np.array([[r.x0, r.y0, r.x1, r.y1] for r in rois if r.side == side], dtype=float)
        x0, y0, x1, y1 = b.mean(axis=0)
        out += [x0 / columns, y0 / rows, x1 / columns, y1 / rows]
    return tuple(out)


def prepare(
    name: str, out: Path, size: int, slices: int
) -> tuple[dict[str, Path], StudyInput, ModelSpec]:
    """Study on disk and checkpoints for pipeline ``name``."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "ct":
        study = generate_ct_study(
            seed=11, subject_index=1, positive=True, side="both", n_slices=slices
        )
        points = EVERY_SLICE.model_copy(update={"study_threshold": 0.5})
        path, spec = _checkpoint(out, ct_spec(size=size, operating_points=points))
        return {"model": path}, _study_input(study, out / "study"), spec
    study = generate_mr_study(seed=11, subject_index=1, positive=True, side="both", n_slices=slices)
    points = EVERY_SLICE.model_copy(update={"subject_threshold": 0.5})
    path, spec = _checkpoint(
        out,
        mr_spec(
            size=size, preprocessing={"kind": "mr", "patch_size": size}, operating_points=points
        ),
    )
    loc = localizer_spec()
    loc_path = out / "localizer.safetensors"
    save_checkpoint(loc_path, loc, fixed_box_localizer_state(loc, _truth_boxes(study), 1))
    return {"model": path, "localizer": loc_path}, _study_input(study, out / "study"), spec


def bare_rate(
    spec: ModelSpec, n: int, batch: int, device: str, dtype: torch.dtype, rounds: int = 1
) -> float:
    """Slices/s of ``model(x)`` on ready tensors (same batch, memory format, precision)."""
    model = build(spec).eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    x = torch.randn(n, 3, *spec.input_size).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x[:batch])  # warm-up
        best = float("inf")
        for _ in range(rounds):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for start in range(0, n, batch):
                model(x[start : start + batch])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return n / best


def run_cpu(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    options = PredictOptions(
        batch_size=args.batch, max_explained=args.max_explained, decode_threads=args.decode_threads
    )
    loaded: dict[str, tuple[LoadedPipeline, StudyInput, ModelSpec]] = {}
    for name in args.pipelines:
        slices = args.ct_slices if name == "ct" else args.mr_slices
        models, study, spec = prepare(name, work / name, args.size, slices)
        pipeline = get_pipeline(name).load(models, "cpu", options)
        pipeline.predict(study)  # warm-up
        loaded[name] = (pipeline, study, spec)
    figures = {name: Figures(name) for name in loaded}
    for _ in range(args.rounds):
        for name, (pipeline, study, spec) in loaded.items():
            t = time.perf_counter()
            result = pipeline.predict(study)
            wall = time.perf_counter() - t
            n = len(result.slices)
            f = figures[name]
            f.slices, f.explained = n, len(result.explanations)
            f.pipeline_rate.append(n / wall)
            bare = bare_rate(spec, n, args.batch, "cpu", torch.float32)
            f.bare_rate.append(bare)
            f.ratio.append((n / wall) / bare)
            per_forward = 1.0 / bare
            explain = result.stage_seconds["explain"] / max(1, len(result.explanations))
            f.explain_fraction.append(explain / per_forward)
            f.stages.append(dict(result.stage_seconds))
    return [f.row() for f in figures.values()]


def run_gpu(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device available: not measured"}
    spec = ct_spec(size=224)
    bare = bare_rate(spec, args.gpu_batch * 8, args.gpu_batch, "cuda", torch.bfloat16, rounds=3)
    models, study, _ = prepare("ct", work / "gpu", 224, args.gpu_slices)
    options = PredictOptions(
        batch_size=args.gpu_batch,
        max_explained=args.max_explained,
        decode_threads=args.gpu_decode_threads,
        precision="bf16",
    )
    pipeline = get_pipeline("ct").load(models, "cuda", options)
    pipeline.predict(study)
    rates = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        result = pipeline.predict(study)
        rates.append(len(result.slices) / (time.perf_counter() - t))
    return {
        "device": torch.cuda.get_device_name(0),
        "bare_resnext50_bf16_channels_last_img_per_s": round(bare, 1),
        "batch": args.gpu_batch,
        "pipeline_slices_per_s": round(statistics.median(rates), 1),
        "pipeline_ratio": round(statistics.median(rates) / bare, 3),
        "decode_threads": args.gpu_decode_threads,
        "stage_seconds": result.stage_seconds,
    }


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"CPU, fp32, channels_last, {args.threads} threads, batch {args.batch}, input "
        f"{args.size}², {args.decode_threads} decode threads, {args.rounds} rounds (medians).",
        "",
        "| pipeline | slices | pipeline slices/s | bare slices/s | ratio (range) | explained "
        "| explain / forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ratio_range"]
        lines.append(
            f"| {r['pipeline']} | {r['slices']} | {r['pipeline_slices_per_s']} | "
            f"{r['bare_slices_per_s']} | {r['ratio']}× ({lo}–{hi}) | {r['explained']} | "
            f"{r['explain_fraction_of_forward']}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pipelines", nargs="+", default=["ct", "mr"], choices=["ct", "mr"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="network input (224 as the papers)")
    parser.add_argument("--ct-slices", type=int, default=64)
    parser.add_argument("--mr-slices", type=int, default=37)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--max-explained", type=int, default=8)
    parser.add_argument("--gpu", action="store_true", help="add the GPU section (CUDA)")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--gpu-slices", type=int, default=512)
    parser.add_argument("--gpu-decode-threads", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sijnode-bench-") as tmp:
        rows = run_cpu(args, Path(tmp))
        gpu = run_gpu(args, Path(tmp)) if args.gpu else None
    print(markdown(rows, args))
    for r in rows:
        print(f"\n{r['pipeline']} stage seconds (median round): {r['stage_seconds']}")
    if gpu is not None:
        print("\nGPU:", json.dumps(gpu))
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": rows, "gpu": gpu}, indent=1) + "\n")


if __name__ == "__main__":
    main()
