"""The SI-joint localiser: ``LocalizerCNN`` regresses both iliac boxes per MR slice.

Trained on the annotated boxes (``rois.csv``) with a smooth-L1 loss on the 8 normalised
coordinates, Adam with cosine decay, subjects split 70:15:15 (best epoch by validation
mean IoU), with flip (boxes swapped), scale and shift augmentation. The report gives, on
the held-out test subjects, the IoU of each predicted box with its annotation, how often
the node's plausibility rules accept the pair, and how often the ROI patch built from the
predicted boxes contains the annotated joint (``samples.roi_contains_joint``: at least
80 % of the band on each annotated iliac box's medial edge inside the ROI box of its
side). Design reasons and the measure's calibration: docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from sijnode.models.architectures import build
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.localizer import _to_source, check_boxes
from sijnode.models.roi import roi_boxes
from sijnode.models.spec import MRPreprocessing, localizer_spec
from sijnode.training.augment import localizer_augmentation
from sijnode.training.common import TrainOptions, job_seed
from sijnode.training.data import load_dataset
from sijnode.training.engine import (
    Device,
    Job,
    cleanup_state,
    epoch_batches,
    fit,
    predict,
    resolve_training_device,
    steps,
)
from sijnode.training.losses import cosine_schedule
from sijnode.training.runs import RunDir, data_hash
from sijnode.training.samples import (
    JOINT_COVERED,
    LocalizerSlices,
    localizer_slices,
    roi_contains_joint,
)
from sijnode.training.splits import holdout_split, subject_labels


def resolved(opts: TrainOptions) -> dict[str, Any]:
    return {
        "size": opts.size or (96 if opts.quick else 128),
        "epochs": opts.epochs or (20 if opts.quick else 60),
        "batch_size": opts.batch_size or (8 if opts.quick else 32),
        "lr": opts.lr or 2e-3,
        "initialisation": "from scratch; last layer starts at the mean training box",
        "optimizer": "Adam, cosine decay per step",
        "loss": "smooth L1 on the 8 normalised box coordinates",
        "augmentation": opts.augment,
    }


def _area(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)


def box_iou(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of boxes (…, 4) as x0, y0, x1, y1 (floats)."""
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    union = _area(a) + _area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def localizer_quality(
    model: nn.Module,
    data: LocalizerSlices,
    idx: npt.NDArray[np.int64],
    device: Device,
    rules: Any,
    shift: float,
) -> dict[str, float]:
    """IoU (in slice pixels), plausibility and joint-containment rate on slices ``idx``."""
    if len(idx) == 0:
        return {"iou": float("nan"), "plausible": float("nan"), "contains_joint": float("nan")}
    out = predict(model, data.inputs[idx], device)
    ious, plausible, contains = [], 0, 0
    for k, values in zip(idx, out, strict=True):
        predicted = _to_source(values.astype(np.float32), data.placements[k])
        truth = np.asarray([b.as_list() for b in data.boxes[k]], dtype=np.float64)
        ious.append(box_iou(np.asarray(predicted, float).reshape(2, 4), truth))
        found = check_boxes(int(k), predicted, data.shapes[k], rules)
        if found.boxes is not None:
            plausible += 1
            rois = roi_boxes(*found.boxes, data.shapes[k], shift)
            contains += roi_contains_joint(data.boxes[k], rois)
    iou = np.asarray(ious)
    return {
        "iou": float(iou.mean()),
        "iou_left": float(iou[:, 0].mean()),
        "iou_right": float(iou[:, 1].mean()),
        "plausible": plausible / len(idx),
        "contains_joint": contains / len(idx),
    }


def run_localizer(opts: TrainOptions) -> Path:
    """``sijnode train localizer``: returns the exported checkpoint's path."""
    studies = load_dataset(Path(opts.data), "MR", need_rois=True)
    if opts.max_subjects:
        keep = sorted({s.subject for s in studies})[: opts.max_subjects]
        studies = [s for s in studies if s.subject in keep]
    settings = resolved(opts)
    # No classes here (box regression): 3 subjects in all for the three-way split.
    split = holdout_split(
        subject_labels([s.subject for s in studies], [s.label for s in studies]),
        seed=opts.seed,
        per_class=0,
    )
    device = Device(resolve_training_device(opts.device), opts.quiet, opts.stop_after)
    run = RunDir(Path(opts.out), opts.config(task="localizer", **settings), opts.resume)
    run.write_json("data.json", data_hash(Path(opts.data), studies))
    run.write_json("splits.json", {split.name: split.as_dict()})
    size = int(settings["size"])
    spec = localizer_spec(size=size)
    mr_prep = MRPreprocessing()
    rules = spec.preprocessing
    data = localizer_slices(studies, rules, (size, size), mr_prep)  # type: ignore[arg-type]
    train_idx = data.of_subjects(split.train)
    val_idx = data.of_subjects(split.validation)
    test_idx = data.of_subjects(split.test)
    name = "localizer-holdout"
    seed = job_seed(opts.seed, name)
    batch = int(settings["batch_size"])
    lr = float(settings["lr"])

    pad = (0.0 - rules.mean[0]) / rules.std[0]  # the letterbox padding, normalised

    def make(chunk: npt.NDArray[np.int64], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = train_idx[chunk]
        if not settings["augmentation"]:
            return torch.from_numpy(data.inputs[idx]), torch.from_numpy(data.targets[idx])
        pairs = [
            # Seeded by (job seed, epoch, slice): the same draw on --resume.
            localizer_augmentation(
                data.inputs[i], data.targets[i], np.random.default_rng([seed, epoch, int(i)]), pad
            )
            for i in idx
        ]
        x = np.stack([p[0] for p in pairs])
        y = np.stack([p[1] for p in pairs])
        return torch.from_numpy(x), torch.from_numpy(y)

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = predict(model, data.inputs[val_idx], device)
        loss = float(
            F.smooth_l1_loss(
                torch.from_numpy(out), torch.from_numpy(data.targets[val_idx]), beta=0.02
            )
        )
        iou = box_iou(
            out.reshape(-1, 2, 4).astype(float),
            data.targets[val_idx].reshape(-1, 2, 4).astype(float),
        )
        return {"loss": loss, "iou": float(iou.mean()), "score": float(iou.mean())}

    mean_box = np.clip(data.targets[train_idx].mean(axis=0), 0.02, 0.98)

    def make_model() -> nn.Module:
        # Start from the mean training box: the network learns offsets from it, which
        # converges in far fewer steps than from sigmoid(0) = 0.5 everywhere.
        model = build(spec)
        last = model.get_submodule("head.3")
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.copy_(torch.from_numpy(np.log(mean_box / (1 - mean_box))))
        return model

    job = Job(
        name=name,
        seed=seed,
        epochs=int(settings["epochs"]),
        build=make_model,
        optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=lr),
        steps_per_epoch=steps(len(train_idx), batch),
        scheduler=lambda opt, total: cosine_schedule(opt, total),
        loss=lambda out, y: F.smooth_l1_loss(out, y, beta=0.02),
        batches=epoch_batches(len(train_idx), batch, seed, make),
        evaluate=evaluate,
    )
    done = run.job_done(name)
    if done is None:
        result = fit(job, device, run.state_dir, resume=opts.resume)
        quality = localizer_quality(result.model, data, test_idx, device, rules, mr_prep.roi_shift)
        done = {
            "job": name,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "test": quality,
            "test_slices": len(test_idx),
            "test_subjects": len(split.test),
        }
        save_checkpoint(run.path / "jobs" / f"{name}.safetensors", spec, result.best_state)
        run.finish_job(name, done)
        cleanup_state(run.state_dir, name)
    run.write_metrics({name: done["history"]})
    from safetensors.torch import load_file

    info = run.read_json("data.json")
    final = localizer_spec(
        size=size,
        training={
            "protocol": "SI-joint localiser, holdout 70:15:15 by subject",
            "initialisation": "from scratch",
            "epochs": settings["epochs"],
            "best_epoch": done["best_epoch"],
            "data_sha256": info["sha256"],
            "seed": opts.seed,
            "test": {k: round(v, 6) for k, v in done["test"].items()},
        },
    )
    target = run.path / "model.safetensors"
    save_checkpoint(target, final, load_file(str(run.path / "jobs" / f"{name}.safetensors")))
    from sijnode.training import reporting

    reporting.write_curves_png(
        {"localiser": [done["history"]]},
        "val_iou",
        run.path / "plots/validation_iou.png",
        "Validation IoU",
        "Localiser",
    )
    reporting.write_curves_png(
        {"localiser": [done["history"]]},
        "train_loss",
        run.path / "plots/training_loss.png",
        "Smooth L1",
        "Localiser loss",
    )
    q = done["test"]
    lines = [
        "# SI-joint localiser report (research use only)",
        "",
        f"Held-out test subjects: {done['test_subjects']} ({done['test_slices']} slices); "
        f"input {size}²; {settings['epochs']} epochs, best epoch {done['best_epoch']} by "
        "validation IoU; trained from scratch.",
        "",
        "| Measure | Test |",
        "|---|---|",
        f"| Mean IoU, both boxes | {q['iou']:.3f} |",
        f"| Mean IoU, image-left box | {q['iou_left']:.3f} |",
        f"| Mean IoU, image-right box | {q['iou_right']:.3f} |",
        f"| Pairs accepted by the node's plausibility rules | {100 * q['plausible']:.1f} % |",
        "| ROI patch from predicted boxes contains the annotated joint | "
        f"{100 * q['contains_joint']:.1f} % |",
        "",
        "The annotated joint of a side: the band ± 0.1 × width on the medial edge of its "
        "annotated iliac box, over the box's rows; contained when the ROI box of that side, "
        f"built from the predicted boxes by the node's rule, holds ≥ {JOINT_COVERED:.0%} of "
        "it on both sides (docs/training.md). "
        + (
            "Augmentation: flip (boxes swapped), scale, shift."
            if settings["augmentation"]
            else "No augmentation."
        ),
        "",
        "![Validation IoU](plots/validation_iou.png)",
        "",
        "![Training loss](plots/training_loss.png)",
        "",
    ]
    (run.path / "report.md").write_text("\n".join(lines))
    return target
