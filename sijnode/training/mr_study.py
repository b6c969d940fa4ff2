"""The MR study (Lee et al. 2021): ROI patches, ResNet18 with a one-hidden-layer head,
focal loss, batch 32, cosine decay from 0.03, 70/30 subject splits repeated, Tables 2-3.

``--compare`` adds the paper's comparisons on the same splits: ResNet18 on the whole slice
(Table 2's first row against the ROI row) and ResNet50 with the same head on the ROI
patches (the paper found it converged less stably). Jobs are named by kind: ``roi``
(ResNet18, ROI: the deployable one), ``whole`` (ResNet18, whole slice) and ``roi50``
(ResNet50, ROI).

Each repeat holds 30 % of its training subjects out for validation (model selection and
thresholds). The exported model is the repeat with the best validation score; its slice
threshold (Youden's J on validation slices) and subject threshold (Youden's J on the
validation subjects' mean filtered decisions) go into the spec. Subject results use
``aggregate.mr_subject`` exactly as the node does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from sijnode.models.aggregate import mr_subject
from sijnode.models.checkpoint import read_spec, save_checkpoint
from sijnode.models.spec import ModelSpec, MRPreprocessing, NoiseStep, OperatingPoints, mr_spec
from sijnode.training import reporting
from sijnode.training.augment import mr_augmentation
from sijnode.training.common import (
    TrainOptions,
    classifier_job,
    job_seed,
    predict_proba,
    spec_model,
)
from sijnode.training.data import load_dataset
from sijnode.training.engine import Device, cleanup_state, fit, resolve_training_device
from sijnode.training.losses import focal_loss
from sijnode.training.runs import RunDir, data_hash
from sijnode.training.samples import MRSlices, mr_slices
from sijnode.training.splits import Split, repeated_subject_splits, subject_labels
from sijnode.training.thresholds import choose_threshold


def resolved(opts: TrainOptions) -> dict[str, Any]:
    quick = opts.quick
    return {
        "size": opts.size or (64 if quick else 224),
        "epochs": opts.epochs or (4 if quick else 50),
        "folds": opts.folds or (2 if quick else 5),
        "batch_size": opts.batch_size or 32,
        "lr": opts.lr or (0.03 if (opts.optimizer or "sgd") == "sgd" else 1e-3),
        "optimizer": opts.optimizer or "sgd",
        "loss": "focal loss gamma 2, alpha = share of negative training slices",
        "noise_step": True,
        "whole_image": bool(opts.compare),
        "resnet50": bool(opts.compare),
    }


#: Job kinds: (input, architecture, the report's label).
KINDS: dict[str, tuple[str, str, str]] = {
    "roi": ("roi", "resnet18_hidden_head", "ResNet18"),
    "whole": ("whole", "resnet18_hidden_head", "ResNet18"),
    "roi50": ("roi", "resnet50_hidden_head", "ResNet50"),
}


def prep_for(size: int) -> MRPreprocessing:
    """The node's MR preprocessing at ``size`` with the paper's noise step switched on."""
    return MRPreprocessing(patch_size=size, noise=NoiseStep(enabled=True))


def run_mr(opts: TrainOptions) -> Path:
    """``sijnode train mr``: returns the exported checkpoint's path."""
    studies = load_dataset(Path(opts.data), "MR", need_rois=True)
    if opts.max_subjects:
        keep = sorted({s.subject for s in studies})[: opts.max_subjects]
        studies = [s for s in studies if s.subject in keep]
    settings = resolved(opts)
    by_subject = subject_labels([s.subject for s in studies], [s.label for s in studies])
    splits = repeated_subject_splits(by_subject, repeats=int(settings["folds"]), seed=opts.seed)
    device = Device(resolve_training_device(opts.device), opts.quiet, opts.stop_after)
    run = RunDir(Path(opts.out), opts.config(task="mr", **settings), opts.resume)
    run.write_json("data.json", data_hash(Path(opts.data), studies))
    run.write_json("splits.json", {s.name: s.as_dict() for s in splits})
    prep = prep_for(int(settings["size"]))
    data = mr_slices(studies, prep, whole_image=bool(settings["whole_image"]))
    kinds = ["roi"] + (["whole"] if settings["whole_image"] else [])
    kinds += ["roi50"] if settings["resnet50"] else []
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        for kind in kinds:
            name = f"{kind}-{split.name}"
            done = run.job_done(name)
            if done is None:
                done = _train(run, opts, settings, device, data, prep, kind, split)
            results[name] = done
    run.write_metrics({k: v["history"] for k, v in results.items()})
    best = max(splits, key=lambda s: (results[f"roi-{s.name}"]["best_score"], -splits.index(s)))
    checkpoint = _export(run, opts, settings, data, results[f"roi-{best.name}"])
    _report(run, settings, data, results, splits, checkpoint)
    return checkpoint


def _train(
    run: RunDir,
    opts: TrainOptions,
    settings: dict[str, Any],
    device: Device,
    data: MRSlices,
    prep: MRPreprocessing,
    kind: str,
    split: Split,
) -> dict[str, Any]:
    name = f"{kind}-{split.name}"
    seed = job_seed(opts.seed, name)
    source, architecture, _ = KINDS[kind]
    inputs = data.roi if source == "roi" else data.whole
    assert inputs is not None
    train_idx = data.of_subjects(split.train)
    val_idx = data.of_subjects(split.validation)
    test_idx = data.of_subjects(split.test)
    spec = mr_spec(size=int(settings["size"]), preprocessing=prep, architecture=architecture)
    augmenters: dict[int, Any] = {}

    def make_input(idx: npt.NDArray[np.int64], epoch: int) -> npt.NDArray[np.float32]:
        if epoch not in augmenters:
            augmenters.clear()
            augmenters[epoch] = mr_augmentation(seed=seed * 1009 + epoch)
        aug = augmenters[epoch]
        out = [
            np.ascontiguousarray(
                aug(image=inputs[i].transpose(1, 2, 0))["image"].transpose(2, 0, 1)
            )
            for i in idx
        ]
        return np.stack(out).astype(np.float32)

    labels = data.labels[train_idx]
    alpha = float(1.0 - labels.mean()) if len(labels) else 0.5
    lr = float(settings["lr"])
    job = classifier_job(
        name,
        seed,
        int(settings["epochs"]),
        int(settings["batch_size"]),
        spec_model(spec, opts.pretrained),
        lambda m: (
            torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
            if settings["optimizer"] == "sgd"
            else torch.optim.Adam(m.parameters(), lr=lr)
        ),
        lambda logits, y: focal_loss(logits, y, gamma=2.0, alpha=alpha),
        train_idx,
        data.labels,
        make_input,
        inputs[val_idx],
        data.labels[val_idx],
        device,
    )
    result = fit(job, device, run.state_dir, resume=opts.resume)
    record = {
        "job": name,
        "kind": kind,
        "split": split.name,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "best_score": result.best_score,
        "history": result.history,
        "focal_alpha": alpha,
        "validation": _predictions(result.model, inputs, val_idx, data, device),
        "test": _predictions(result.model, inputs, test_idx, data, device),
    }
    if source == "roi":
        save_checkpoint(run.path / "jobs" / f"{name}.safetensors", spec, result.best_state)
    run.finish_job(name, record)
    cleanup_state(run.state_dir, name)
    return record


def _predictions(
    model: torch.nn.Module,
    inputs: npt.NDArray[np.float32],
    idx: npt.NDArray[np.int64],
    data: MRSlices,
    device: Device,
) -> dict[str, list[Any]]:
    return {
        "index": idx.tolist(),
        "labels": data.labels[idx].tolist(),
        "study": data.study[idx].tolist(),
        "scores": predict_proba(model, inputs[idx], device).tolist(),
    }


def subjects_of(
    part: dict[str, list[Any]],
    data: MRSlices,
    slice_threshold: float,
    subject_threshold: float,
    median_size: int = 3,
) -> dict[str, Any]:
    """Per study (slices in series order): ``mr_subject`` and the filtered slice decisions."""
    study = np.asarray(part["study"])
    scores = np.asarray(part["scores"], dtype=np.float64)
    labels = np.asarray(part["labels"])
    out: dict[str, Any] = {
        "truth": [],
        "result": [],
        "probability": [],
        "filtered": [],
        "slice_labels": [],
        "slice_scores": [],
    }
    for k in sorted(set(study.tolist())):
        mask = study == k  # slices of one study are stored in series order
        agg = mr_subject(scores[mask], slice_threshold, subject_threshold, median_size)
        out["truth"].append(data.studies[k].label)
        out["result"].append(agg.result)
        out["probability"].append(agg.probability)
        out["filtered"] += agg.filtered_decisions.tolist()
        out["slice_labels"] += labels[mask].tolist()
        out["slice_scores"] += scores[mask].tolist()
    return out


def _thresholds(data: MRSlices, record: dict[str, Any], target: float | None) -> tuple[Any, Any]:
    val = record["validation"]
    slice_t = choose_threshold(val["labels"], val["scores"], target)
    subjects = subjects_of(val, data, slice_t.value, 0.5)
    subject_t = choose_threshold(subjects["truth"], subjects["result"], target)
    return slice_t, subject_t


def _fold_metrics(data: MRSlices, record: dict[str, Any], target: float | None) -> dict[str, Any]:
    slice_t, subject_t = _thresholds(data, record, target)
    test = record["test"]
    subjects = subjects_of(test, data, slice_t.value, subject_t.value)
    decisions = np.asarray(subjects["result"]) >= subject_t.value
    return {
        "slices": reporting.metrics(test["labels"], test["scores"], slice_t.value),
        "filtered": reporting.decision_metrics(
            subjects["slice_labels"], subjects["filtered"], subjects["slice_scores"]
        ),
        "subjects": reporting.decision_metrics(
            subjects["truth"], decisions.astype(float), subjects["probability"]
        ),
        "subject_truth": subjects["truth"],
        "subject_probability": subjects["probability"],
        "thresholds": {"slice": vars(slice_t), "subject": vars(subject_t)},
    }


def _export(
    run: RunDir,
    opts: TrainOptions,
    settings: dict[str, Any],
    data: MRSlices,
    record: dict[str, Any],
) -> Path:
    from safetensors.torch import load_file

    source = run.path / "jobs" / f"{record['job']}.safetensors"
    spec = read_spec(source)
    slice_t, subject_t = _thresholds(data, record, opts.target_sensitivity)
    metrics = _fold_metrics(data, record, opts.target_sensitivity)
    info = run.read_json("data.json")
    ops = OperatingPoints(
        slice_threshold=slice_t.value,
        subject_threshold=subject_t.value,
        chosen_by=f"slice: {slice_t.rule}; subject: {subject_t.rule}",
        data=f"validation subjects of {record['split']}, run data {info['sha256'][:12]}",
    )
    training = {
        "protocol": "Lee et al. 2021 (MR), 70/30 by subject, validation held out",
        "initialisation": f"pretrained {Path(opts.pretrained).name}"
        if opts.pretrained
        else "from scratch",
        "split": record["split"],
        "epochs": settings["epochs"],
        "best_epoch": record["best_epoch"],
        "patch_size": settings["size"],
        "data_sha256": info["sha256"],
        "seed": opts.seed,
        "test_slices": _finite(metrics["slices"]),
        "test_subjects": _finite(metrics["subjects"]),
    }
    final = ModelSpec.model_validate(
        spec.model_dump(mode="json")
        | {
            "name": "mr-resnet18-trained",
            "operating_points": ops.model_dump(mode="json"),
            "training": training,
        }
    )
    target = run.path / "model.safetensors"
    save_checkpoint(target, final, load_file(str(source)))
    return target


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 6) if np.isfinite(v) else None) for k, v in values.items()}


def _report(
    run: RunDir,
    settings: dict[str, Any],
    data: MRSlices,
    results: dict[str, dict[str, Any]],
    splits: list[Split],
    checkpoint: Path,
) -> None:
    final = read_spec(checkpoint)
    # Table 2's rows in the paper's order (ResNet18), then the ResNet50 comparison.
    order2 = [
        ("whole", "slices", "Whole image (ResNet18)"),
        ("roi", "slices", "ROI (ResNet18)"),
        ("roi", "filtered", "ROI + median filter (ResNet18)"),
        ("roi50", "slices", "ROI (ResNet50)"),
        ("roi50", "filtered", "ROI + median filter (ResNet50)"),
    ]
    order3 = [
        ("roi", "Subjects, ResNet18 (ROI + median filter + mean)"),
        ("roi50", "Subjects, ResNet50 (ROI + median filter + mean)"),
    ]
    rows2: dict[str, list[dict[str, float]]] = {}
    rows3: dict[str, list[dict[str, float]]] = {}
    rocs: dict[str, list[tuple[str, Any, Any]]] = {}
    per_fold: dict[str, Any] = {}
    for split in splits:
        fold: dict[str, dict[str, Any]] = {
            kind: _fold_metrics(data, results[f"{kind}-{split.name}"], None)
            for kind in KINDS
            if f"{kind}-{split.name}" in results
        }
        roi = fold["roi"]
        per_fold[split.name] = {k: roi[k] for k in ("slices", "filtered", "subjects", "thresholds")}
        if "whole" in fold:
            per_fold[split.name]["whole"] = fold["whole"]["slices"]
        if "roi50" in fold:
            per_fold[split.name]["resnet50"] = {
                k: fold["roi50"][k] for k in ("slices", "filtered", "subjects", "thresholds")
            }
        for kind, level, label in order2:
            if kind in fold:
                rows2.setdefault(label, []).append(fold[kind][level])
        for kind, label in order3:
            if kind in fold:
                rows3.setdefault(label, []).append(fold[kind]["subjects"])
        for kind, metrics in fold.items():
            test = results[f"{kind}-{split.name}"]["test"]
            rocs.setdefault(f"slices_{kind}", []).append(
                (split.name, test["labels"], test["scores"])
            )
            if kind != "whole":
                rocs.setdefault(f"subjects_{kind}", []).append(
                    (split.name, metrics["subject_truth"], metrics["subject_probability"])
                )
    run.write_json("results.json", per_fold)
    # ResNet18 ROI keeps the historical names; the comparisons get their own files.
    names = {"slices_roi": "roc_slices", "subjects_roi": "roc_subjects"}
    figures = []
    for key, folds in rocs.items():
        name = names.get(key, f"roc_{key}")
        reporting.roc_png(folds, run.path / f"plots/{name}.png")
        level, kind = key.split("_")
        _, _, network = KINDS[kind]
        what = "whole image" if kind == "whole" else "ROI"
        figures.append(f"![ROC per repeat, {level}, {network} {what}](plots/{name}.png)")
    labels = {"roi": "ROI, ResNet18", "whole": "Whole image, ResNet18", "roi50": "ROI, ResNet50"}
    curves = {
        labels[kind]: [r["history"] for r in results.values() if r["kind"] == kind]
        for kind in KINDS
    }
    curves = {k: v for k, v in curves.items() if v}
    reporting.write_curves_png(
        curves,
        "val_accuracy",
        run.path / "plots/training_curves.png",
        "Validation accuracy",
        "MR training curves",
    )
    reporting.write_curves_png(
        curves, "train_loss", run.path / "plots/training_loss.png", "Focal loss", "MR training loss"
    )
    ops = final.operating_points
    total = sum(len(study.slices) for study in data.studies)
    lines = [
        "# MR training report (research use only)",
        "",
        "Protocol: Lee et al. 2021 (PROTOCOLS.md B). ROI patches from the annotated iliac boxes "
        "by the node's rule (0.8 × width shift, heights matched, joined, resized) after the "
        "seeded noise step; ResNet18 with a one-hidden-layer head; focal loss; batch "
        f"{settings['batch_size']}; {settings['optimizer']} with cosine decay from "
        f"{settings['lr']}; horizontal "
        f"flip and rotation only; {settings['folds']} repeats of a 70/30 subject split with "
        f"30 % of the training subjects held out for validation; {settings['epochs']} epochs; "
        f"patch {settings['size']}²; "
        + (
            "ImageNet-pretrained initialisation."
            if run.config.get("pretrained")
            else "trained from scratch (no pretrained weights)."
        )
        + " Thresholds per repeat: Youden's J on its validation subjects. "
        + (
            "Comparisons on the same splits: ResNet18 on the whole slice (same noise step and "
            "scaling, letterboxed to the patch size) and ResNet50 with the same head on the "
            "ROI patches."
            if settings.get("resnet50") or settings.get("whole_image")
            else "No comparisons (--no-compare)."
        ),
        "",
        f"Slices: {len(data.labels)} with both annotated iliac boxes, of {total} in the series; "
        f"{total - len(data.labels)} edge slices without the pair are left out "
        "(docs/training.md).",
        "",
        "## Table 2 layout: slices, mean ± sd over repeats (%)",
        "",
        reporting.fold_table(rows2, reporting.TABLE23, "Input"),
        "",
        "## Table 3 layout: subjects, mean ± sd over repeats (%)",
        "",
        reporting.fold_table(rows3, reporting.TABLE23, "Level"),
        "",
        "## Deployable model",
        "",
        f"From {final.training.get('split')} (best validation score), best epoch "
        f"{final.training.get('best_epoch')}; slice threshold {ops.slice_threshold:.4f}, subject "
        f"threshold {ops.subject_threshold:.4f} ({ops.chosen_by}). Checkpoint "
        f"`model.safetensors` ({final.version}); the MR pipeline also needs a localiser "
        "(`sijnode train localizer`).",
        "",
        "## Figures",
        "",
        *[line for figure in figures for line in (figure, "")],
        "![Training curves](plots/training_curves.png)",
        "",
        "![Training loss](plots/training_loss.png)",
        "",
    ]
    (run.path / "report.md").write_text("\n".join(lines))
