"""The CT study (Fu et al. 2024): slice classifiers, 70:15:15 holdout and stratified k-fold
cross-validation by subject, the five-architecture comparison, Table 1 and Fig. 4.

The holdout split of the main architecture (ResNeXt-50 32x4d) gives the deployable model:
best epoch and thresholds on its validation subjects, metrics on its test subjects. The
folds give Table 1 (mean ± sd over folds); each fold fits its own whitening and picks its
threshold on its own validation subjects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from sijnode.errors import TrainingError
from sijnode.models.aggregate import ct_study
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.spec import CTPreprocessing, ModelSpec, OperatingPoints, ct_spec
from sijnode.training import reporting
from sijnode.training.augment import ct_augmentation
from sijnode.training.common import (
    TrainOptions,
    classifier_job,
    job_seed,
    pos_weight,
    predict_proba,
    spec_model,
)
from sijnode.training.data import load_dataset
from sijnode.training.engine import Device, cleanup_state, fit, resolve_training_device
from sijnode.training.runs import RunDir, data_hash
from sijnode.training.samples import CTSlices, ct_finish, ct_slices, fit_whitening
from sijnode.training.splits import Split, holdout_split, stratified_group_folds, subject_labels
from sijnode.training.thresholds import choose_threshold

MAIN_ARCHITECTURE = "resnext50_32x4d"
#: timm's Inception-v4 stem reduces 64 px inputs below its kernels.
MIN_INCEPTION_SIZE = 96
#: Fu et al. 2024's five networks, in Table 1 order.
COMPARISON = ("vgg16", "resnet101", "densenet121", "inception_v4", "resnext50_32x4d")
NAMES = {
    "vgg16": "VGG16",
    "resnet101": "ResNet101",
    "densenet121": "DenseNet-121",
    "inception_v4": "Inception-v4",
    "resnext50_32x4d": "ResNeXt-50 32x4d",
}


def resolved(opts: TrainOptions) -> dict[str, Any]:
    """The protocol's settings after ``--quick`` and the defaults."""
    quick = opts.quick
    return {
        "size": opts.size or (96 if quick else 224),
        "epochs": opts.epochs or (3 if quick else 20),
        "folds": opts.folds or (3 if quick else 10),
        "batch_size": opts.batch_size or (16 if quick else 32),
        "lr": opts.lr or (1e-3 if opts.pretrained is None else 1e-4),
        "optimizer": "AdamW (weight decay 1e-4), cosine decay per step",
        "loss": "BCE with logits, pos_weight = negatives / positives of the training slices",
        "architectures": list(COMPARISON) if opts.compare else [MAIN_ARCHITECTURE],
    }


def study_scores(
    probabilities: npt.NDArray[np.float64], study: npt.NDArray[np.int64], spec: ModelSpec
) -> tuple[list[int], list[float]]:
    """Study ids and study scores by the node's rule (``aggregate.ct_study``)."""
    ids = sorted(set(study.tolist()))
    scores = [
        ct_study(
            probabilities[study == k], 0.5, spec.aggregation.median_size, spec.aggregation.top_k
        ).score
        for k in ids
    ]
    return ids, scores


def run_ct(opts: TrainOptions) -> Path:
    """``sijnode train ct``: returns the exported checkpoint's path."""
    studies = load_dataset(Path(opts.data), "CT")
    if opts.max_subjects:
        keep = sorted({s.subject for s in studies})[: opts.max_subjects]
        studies = [s for s in studies if s.subject in keep]
    settings = resolved(opts)
    if "inception_v4" in settings["architectures"] and settings["size"] < MIN_INCEPTION_SIZE:
        raise TrainingError(
            f"--compare: Inception-v4 needs an input of at least {MIN_INCEPTION_SIZE} px, "
            f"got --size {settings['size']}"
        )
    # The splits first: too few subjects for them is refused before anything is written.
    by_subject = subject_labels([s.subject for s in studies], [s.label for s in studies])
    holdout = holdout_split(by_subject, seed=opts.seed)
    # --folds 1: the holdout split only (no cross-validation).
    folds = (
        stratified_group_folds(
            [s.subject for s in studies],
            [s.label for s in studies],
            settings["folds"],
            seed=opts.seed,
        )
        if settings["folds"] > 1
        else []
    )
    splits = [holdout, *folds]
    device = Device(resolve_training_device(opts.device), opts.quiet, opts.stop_after)
    run = RunDir(Path(opts.out), opts.config(task="ct", **settings), opts.resume)
    run.write_json("data.json", data_hash(Path(opts.data), studies))
    run.write_json("splits.json", {s.name: s.as_dict() for s in splits})
    size = int(settings["size"])
    base = CTPreprocessing(body_crop=opts.body_crop)
    data = ct_slices(studies, base, (size, size))
    results: dict[str, dict[str, Any]] = {}
    for architecture in settings["architectures"]:
        for split in splits:
            if split.name == "holdout" and architecture != MAIN_ARCHITECTURE:
                continue
            name = f"{architecture}-{split.name}"
            done = run.job_done(name)
            if done is None:
                done = _train_split(run, opts, settings, device, data, base, architecture, split)
            results[name] = done
    histories = {k: v["history"] for k, v in results.items()}
    run.write_metrics(histories)
    checkpoint = _export(run, opts, settings, data, results[f"{MAIN_ARCHITECTURE}-holdout"])
    _report(run, settings, data, results, checkpoint)
    return checkpoint


def _spec_for(architecture: str, size: int, prep: CTPreprocessing) -> ModelSpec:
    return ct_spec(
        name=f"ct-{architecture}", size=size, architecture=architecture, preprocessing=prep
    )


def _train_split(
    run: RunDir,
    opts: TrainOptions,
    settings: dict[str, Any],
    device: Device,
    data: CTSlices,
    base: CTPreprocessing,
    architecture: str,
    split: Split,
) -> dict[str, Any]:
    name = f"{architecture}-{split.name}"
    seed = job_seed(opts.seed, name)
    size = int(settings["size"])
    train_idx = data.of_subjects(split.train)
    val_idx = data.of_subjects(split.validation)
    test_idx = data.of_subjects(split.test)
    whitening = fit_whitening(data.images[train_idx], seed=seed) if opts.whitening else None
    prep = base.model_copy(update={"whitening": whitening})
    spec = _spec_for(architecture, size, prep)
    augmenters: dict[int, Any] = {}

    def make_input(idx: npt.NDArray[np.int64], epoch: int) -> npt.NDArray[np.float32]:
        if epoch not in augmenters:
            augmenters.clear()
            augmenters[epoch] = ct_augmentation(size, seed=seed * 1009 + epoch)
        aug = augmenters[epoch]
        out = []
        for i in idx:
            u8 = np.round(data.images[i] * 255.0).astype(np.uint8)
            rgb = aug(image=np.repeat(u8[..., None], 3, axis=2))["image"]
            out.append(ct_finish(rgb.astype(np.float32) / 255.0, prep))
        return np.stack(out)

    def finished(idx: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        return (
            np.stack([ct_finish(data.images[i], prep) for i in idx])
            if len(idx)
            else np.zeros((0, prep.channels, size, size), np.float32)
        )

    val_inputs = finished(val_idx)
    weight = torch.tensor(pos_weight(data.labels[train_idx]))
    lr = float(settings["lr"])

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=weight.to(logits.device)
        )

    job = classifier_job(
        name,
        seed,
        int(settings["epochs"]),
        int(settings["batch_size"]),
        spec_model(spec, opts.pretrained),
        lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4),
        loss,
        train_idx,
        data.labels,
        make_input,
        val_inputs,
        data.labels[val_idx],
        device,
    )
    result = fit(job, device, run.state_dir, resume=opts.resume)
    val_p = predict_proba(result.model, val_inputs, device)
    test_p = predict_proba(result.model, finished(test_idx), device)
    record: dict[str, Any] = {
        "job": name,
        "architecture": architecture,
        "split": split.name,
        "seed": seed,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "pos_weight": float(weight),
        "validation": {
            "index": val_idx.tolist(),
            "labels": data.labels[val_idx].tolist(),
            "scores": val_p.tolist(),
        },
        "test": {
            "index": test_idx.tolist(),
            "labels": data.labels[test_idx].tolist(),
            "scores": test_p.tolist(),
        },
        "whitening": whitening.model_dump(mode="json") if whitening else None,
    }
    if split.name == "holdout":
        save_checkpoint(run.path / "jobs" / f"{name}.safetensors", spec, result.best_state)
    run.finish_job(name, record)
    cleanup_state(run.state_dir, name)
    return record


def _thresholds(
    data: CTSlices, record: dict[str, Any], spec: ModelSpec, target: float | None
) -> dict[str, Any]:
    val = record["validation"]
    idx = np.asarray(val["index"], dtype=np.int64)
    scores = np.asarray(val["scores"])
    slice_t = choose_threshold(val["labels"], scores, target)
    ids, study_s = study_scores(scores, data.study[idx], spec)
    study_t = choose_threshold([data.studies[k].label for k in ids], study_s, target)
    return {"slice": slice_t, "study": study_t}


def _split_metrics(
    data: CTSlices, record: dict[str, Any], spec: ModelSpec, target: float | None
) -> dict[str, Any]:
    chosen = _thresholds(data, record, spec, target)
    test = record["test"]
    idx = np.asarray(test["index"], dtype=np.int64)
    scores = np.asarray(test["scores"])
    slices = reporting.metrics(test["labels"], scores, chosen["slice"].value)
    ids, study_s = study_scores(scores, data.study[idx], spec)
    truth = [data.studies[k].label for k in ids]
    studies = reporting.metrics(truth, study_s, chosen["study"].value)
    return {
        "slices": slices,
        "studies": studies,
        "study_truth": truth,
        "study_scores": study_s,
        "thresholds": {k: vars(v) for k, v in chosen.items()},
    }


def _export(
    run: RunDir,
    opts: TrainOptions,
    settings: dict[str, Any],
    data: CTSlices,
    record: dict[str, Any],
) -> Path:
    from safetensors.torch import load_file

    from sijnode.models.checkpoint import read_spec
    from sijnode.models.spec import Whitening

    source = run.path / "jobs" / f"{record['job']}.safetensors"
    spec = read_spec(source)
    chosen = _thresholds(data, record, spec, opts.target_sensitivity)
    metrics = _split_metrics(data, record, spec, opts.target_sensitivity)
    prep = spec.preprocessing
    assert isinstance(prep, CTPreprocessing)
    if record["whitening"]:
        prep = prep.model_copy(update={"whitening": Whitening.model_validate(record["whitening"])})
    data_info = run.read_json("data.json")
    ops = OperatingPoints(
        slice_threshold=chosen["slice"].value,
        study_threshold=chosen["study"].value,
        chosen_by=chosen["slice"].rule,
        data=f"validation split of run data {data_info['sha256'][:12]} "
        f"({len(run.read_json('splits.json')['holdout']['validation'])} subjects)",
    )
    training = {
        "protocol": "Fu et al. 2024 (CT), holdout 70:15:15 by subject",
        "initialisation": f"pretrained {Path(opts.pretrained).name}"
        if opts.pretrained
        else "from scratch",
        "epochs": settings["epochs"],
        "best_epoch": record["best_epoch"],
        "input_size": settings["size"],
        "data_sha256": data_info["sha256"],
        "seed": opts.seed,
        "class_balance": f"BCE pos_weight {record['pos_weight']:.3f}",
        "test_slices": _finite(metrics["slices"]),
        "test_studies": _finite(metrics["studies"]),
    }
    final = ModelSpec.model_validate(
        spec.model_dump(mode="json")
        | {
            "name": "ct-resnext50-trained",
            "preprocessing": prep.model_dump(mode="json"),
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
    data: CTSlices,
    results: dict[str, dict[str, Any]],
    checkpoint: Path,
) -> None:
    from sijnode.models.checkpoint import read_spec

    final = read_spec(checkpoint)
    assert isinstance(final.preprocessing, CTPreprocessing)
    table_slices: dict[str, list[dict[str, float]]] = {}
    table_studies: dict[str, list[dict[str, float]]] = {}
    curves: dict[str, list[list[dict[str, float]]]] = {}
    per_fold: dict[str, Any] = {}
    figures: list[tuple[str, str]] = []
    for architecture in settings["architectures"]:
        label = NAMES[architecture]
        rocs = []
        for name, record in results.items():
            if record["architecture"] != architecture:
                continue
            curves.setdefault(label, []).append(record["history"])
            if record["split"] == "holdout":
                continue
            spec = _spec_for(architecture, int(settings["size"]), final.preprocessing)
            m = _split_metrics(data, record, spec, None)
            per_fold[name] = {k: m[k] for k in ("slices", "studies", "thresholds")}
            table_slices.setdefault(label, []).append(m["slices"])
            table_studies.setdefault(label, []).append(m["studies"])
            rocs.append((record["split"], record["test"]["labels"], record["test"]["scores"]))
        if rocs:
            png = f"plots/roc_{architecture}.png"
            reporting.roc_png(rocs, run.path / png)
            figures.append((f"ROC per fold, {label} (test slices)", png))
    reporting.write_curves_png(
        curves,
        "val_accuracy",
        run.path / "plots/training_curves.png",
        "Validation accuracy",
        "Training curves (Fu et al. 2024 Fig. 4)",
    )
    reporting.write_curves_png(
        curves, "train_loss", run.path / "plots/training_loss.png", "Training loss", "Training loss"
    )
    holdout = results[f"{MAIN_ARCHITECTURE}-holdout"]
    hold = _split_metrics(data, holdout, final, None)
    reporting.roc_png(
        [
            ("holdout test slices", holdout["test"]["labels"], holdout["test"]["scores"]),
            ("holdout test studies", hold["study_truth"], hold["study_scores"]),
        ],
        run.path / "plots/roc_holdout.png",
    )
    run.write_json(
        "results.json",
        {"folds": per_fold, "holdout": {k: hold[k] for k in ("slices", "studies", "thresholds")}},
    )
    ops = final.operating_points
    lines = [
        "# CT training report (research use only)",
        "",
        "Protocol: Fu et al. 2024 (PROTOCOLS.md A). Slices preprocessed by the node's "
        "`ct_slice` (window, CLAHE, "
        + ("crop to the body, " if final.preprocessing.body_crop else "")
        + "resize, ZCA whitening fitted on each split's training "
        "slices); albumentations augmentation; class balance by BCE `pos_weight`; splits by "
        f"subject. {settings['folds']}-fold stratified group cross-validation; "
        f"{settings['epochs']} epochs; input {settings['size']}²; "
        + (
            "ImageNet-pretrained initialisation."
            if run.config.get("pretrained")
            else "trained from scratch (no pretrained weights)."
        )
        + " Thresholds per fold: Youden's J on the fold's validation subjects.",
        "",
        "## Table 1 layout: test slices, mean ± sd over folds (%)",
        "",
        reporting.fold_table(table_slices, reporting.TABLE1),
        "",
        "## Study level (node rule: median filter 3, top-3 mean), mean ± sd over folds (%)",
        "",
        reporting.fold_table(table_studies, reporting.TABLE1),
        "",
        "## Deployable model: ResNeXt-50 32x4d, holdout 70:15:15",
        "",
        f"Best epoch {holdout['best_epoch']} on validation; slice threshold "
        f"{ops.slice_threshold:.4f}, study threshold {ops.study_threshold:.4f} ({ops.chosen_by}).",
        "",
        reporting.fold_table(
            {"test slices": [hold["slices"]], "test studies": [hold["studies"]]},
            reporting.TABLE1,
            "Holdout",
        ),
        "",
        f"Checkpoint: `model.safetensors` ({final.version}, weights sha256 "
        f"{final.weights_sha256[:16]}…).",
        "",
        "## Figures",
        "",
        "![Training curves](plots/training_curves.png)",
        "",
        "![Training loss](plots/training_loss.png)",
        "",
        "![Holdout ROC](plots/roc_holdout.png)",
        "",
    ]
    for title, png in figures:
        lines += [f"![{title}]({png})", ""]
    (run.path / "report.md").write_text("\n".join(lines))
