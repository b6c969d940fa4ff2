"""`sijnode train` machinery at tiny sizes: the node's preprocessing reused exactly, ROI
patches by the annotation rule, thresholds on validation data, the run directory, bad
input reported before training, and ``--resume`` giving the same checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from typer.testing import CliRunner

from sijnode.models.checkpoint import load_model, read_spec, verify_checkpoint
from sijnode.models.preprocess import ct_base, ct_slice
from sijnode.models.registry import StudyInput, get_pipeline
from sijnode.models.spec import CTPreprocessing
from sijnode.synth import generate_dataset, write_dataset
from sijnode.training.data import load_dataset
from sijnode.training.mr_study import prep_for
from sijnode.training.samples import (
    annotated_iliac_boxes,
    ct_finish,
    fit_whitening,
    mr_slices,
    read_study_series,
)
from sijnode.training.thresholds import choose_threshold

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny")
    write_dataset(out, generate_dataset(seed=5, n_subjects=6, positive_fraction=0.5, n_slices=5))
    return out


def _cli(*args: str) -> tuple[int, str]:
    from sijnode.cli import _register_parts, app

    _register_parts()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (repr(result.exception) if result.exception else "")


def test_ct_training_input_is_the_nodes_ct_slice(root: Path) -> None:
    study = load_dataset(root, "CT")[0]
    series = read_study_series(study)
    hu = series.decode(2)
    prep = CTPreprocessing()
    base = ct_base(hu, prep, (64, 64))[0]
    assert np.array_equal(ct_finish(base, prep), ct_slice(hu, prep, (64, 64))[0])
    whitened = prep.model_copy(update={"whitening": fit_whitening(base[None], samples=2000)})
    assert np.allclose(ct_finish(base, whitened), ct_slice(hu, whitened, (64, 64))[0], atol=1e-5)
    cropped = CTPreprocessing(body_crop=True)
    base = ct_base(hu, cropped, (64, 64))[0]
    assert np.array_equal(ct_finish(base, cropped), ct_slice(hu, cropped, (64, 64))[0])
    assert ct_slice(hu, cropped, (64, 64))[1].region is not None


def test_roi_patches_follow_the_annotation_rule(root: Path) -> None:
    """The paper's rule written out by hand from rois.csv, against the training patches."""
    studies = load_dataset(root, "MR", need_rois=True)[:1]
    prep = prep_for(64).model_copy(
        update={"noise": prep_for(64).noise.model_copy(update={"enabled": False})}
    )
    data = mr_slices(studies, prep)
    series = read_study_series(studies[0])
    with (root / "rois.csv").open() as fh:
        rows = [
            r for r in csv.DictReader(fh) if r["SeriesInstanceUID"] == series.series_instance_uid
        ]
    k = len(series) // 2
    uid = series.slices[k].sop_instance_uid
    boxes = sorted(
        ([int(r[c]) for c in ("x0", "y0", "x1", "y1")] for r in rows if r["SOPInstanceUID"] == uid),
        key=lambda b: b[0] + b[2],
    )
    assert annotated_iliac_boxes(studies[0], series)[k] is not None
    (lx0, ly0, lx1, ly1), (rx0, ry0, rx1, ry1) = boxes
    dl, dr = round(0.8 * (lx1 - lx0)), round(0.8 * (rx1 - rx0))
    left = [lx0 + dl, ly0, lx1 + dl, ly1]  # image-left box moves right, toward the sacrum
    right = [rx0 - dr, ry0, rx1 - dr, ry1]  # image-right box moves left
    height = max(left[3] - left[1], right[3] - right[1])
    for box in (left, right):  # the lower box grows about its centre
        extra = height - (box[3] - box[1])
        box[1] -= extra // 2
        box[3] = box[1] + height
    pixels = series.decode(k)
    low, high = np.percentile(pixels, prep.intensity_percentiles)
    scaled = np.clip((pixels - low) / (high - low), 0, 1).astype(np.float32)
    joined = np.hstack([scaled[b[1] : b[3], b[0] : b[2]] for b in (left, right)])
    expected = cv2.resize(joined, (64, 64), interpolation=cv2.INTER_AREA)
    position = int(np.flatnonzero((data.position == k) & (data.study == 0))[0])
    got = data.roi[position, 0] * prep.std[0] + prep.mean[0]
    assert np.abs(got - expected).max() < 0.02


def test_thresholds_by_youden_and_target_sensitivity() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.4
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    chosen = choose_threshold(y, s)
    fpr, tpr, thr = skm.roc_curve(y, s)
    best = thr[int(np.argmax(tpr - fpr))]
    below = s[s < best].max()
    assert chosen.value == pytest.approx((best + below) / 2)
    assert chosen.sensitivity - (1 - chosen.specificity) == pytest.approx(float(np.max(tpr - fpr)))
    triage = choose_threshold(y, s, target_sensitivity=0.95)
    assert ((s >= triage.value) & y).sum() / y.sum() >= 0.95
    assert triage.value < chosen.value


def test_bad_input_is_reported_before_training(root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    with (bad / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    rows[1]["slice_labels"] += "0"
    with (bad / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, output = _cli(
        "train", "mr", "--data", str(bad), "--out", str(tmp_path / "run"), "--quick"
    )
    assert code != 0
    assert "labels.csv:3: slice_labels has 6 characters" in output
    assert not (tmp_path / "run").exists()  # nothing started


def _localizer(root: Path, out: Path, *extra: str) -> tuple[int, str]:
    return _cli(
        "train",
        "localizer",
        "--data",
        str(root),
        "--out",
        str(out),
        "--quick",
        "--quiet",
        "--epochs",
        "3",
        "--size",
        "64",
        "--seed",
        "4",
        *extra,
    )


def test_resume_gives_the_same_checkpoint_and_run_directory(root: Path, tmp_path: Path) -> None:
    code, output = _localizer(root, tmp_path / "whole")
    assert code == 0, output
    code, output = _localizer(root, tmp_path / "cut", "--stop-after", "1")
    assert code != 0 and "stopped after 1 epoch" in output
    state = json.loads((tmp_path / "cut/state/localizer-holdout.json").read_text())
    assert state["epoch"] == 1 and not (tmp_path / "cut/model.safetensors").exists()
    code, output = _localizer(root, tmp_path / "cut")
    assert code != 0 and "--resume" in output  # a used run directory is not overwritten
    code, output = _localizer(root, tmp_path / "cut", "--resume")
    assert code == 0, output
    whole = verify_checkpoint(tmp_path / "whole/model.safetensors", "si_joint_localizer")
    resumed = verify_checkpoint(tmp_path / "cut/model.safetensors", "si_joint_localizer")
    assert whole.weights_sha256 == resumed.weights_sha256
    run = tmp_path / "whole"
    for name in (
        "config.json",
        "version.json",
        "data.json",
        "splits.json",
        "metrics.json",
        "metrics.csv",
        "report.md",
        "plots/validation_iou.png",
    ):
        assert (run / name).is_file(), name
    assert json.loads((run / "version.json").read_text())["sijnode"]
    assert len(json.loads((run / "data.json").read_text())["sha256"]) == 64
    splits = json.loads((run / "splits.json").read_text())["holdout"]
    assert not set(splits["train"]) & set(splits["test"])
    assert len(json.loads((run / "metrics.json").read_text())["localizer-holdout"]) == 3
    assert "IoU" in (run / "report.md").read_text()
    assert not list((run / "state").iterdir())  # the state goes once the job is done


def test_mr_run_exports_a_checkpoint_the_pipeline_runs(root: Path, tmp_path: Path) -> None:
    code, output = _localizer(root, tmp_path / "loc")
    assert code == 0, output
    code, output = _cli(
        "train",
        "mr",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "mr"),
        "--quick",
        "--quiet",
        "--epochs",
        "1",
        "--size",
        "32",
        "--folds",
        "2",
        "--batch-size",
        "8",
    )
    assert code == 0, output
    spec = read_spec(tmp_path / "mr/model.safetensors")
    assert spec.preprocessing.noise.enabled  # type: ignore[union-attr]
    assert spec.operating_points.data.startswith("validation subjects")
    assert spec.training["protocol"].startswith("Lee et al. 2021")
    report = (tmp_path / "mr/report.md").read_text()
    for row in (
        "| Whole image (ResNet18) | 2 |",
        "| ROI (ResNet18) | 2 |",
        "| ROI + median filter (ResNet18) | 2 |",
        "| ROI (ResNet50) | 2 |",
        "| Subjects, ResNet50 (ROI + median filter + mean) | 2 |",
        "Table 3",
        "NPV",
        "plots/roc_slices_roi50.png",
    ):
        assert row in report, row
    results = json.loads((tmp_path / "mr/results.json").read_text())
    assert set(results["repeat1"]) >= {"slices", "whole", "resnet50"}
    # The comparison network's checkpoint is a valid MR classifier the node can load.
    resnet50 = verify_checkpoint(tmp_path / "mr/jobs/roi50-repeat1.safetensors")
    assert resnet50.architecture == "resnet50_hidden_head"
    assert spec.architecture == "resnet18_hidden_head"  # the deployable one is the paper's
    model, _ = load_model(tmp_path / "mr/model.safetensors")
    assert model is not None
    loaded = get_pipeline("mr").load(
        {
            "model": tmp_path / "mr/model.safetensors",
            "localizer": tmp_path / "loc/model.safetensors",
        }
    )
    study = load_dataset(root, "MR")[0]
    result = loaded.predict(
        StudyInput.from_paths(
            study.study_instance_uid, {study.series_instance_uid: [s.path for s in study.slices]}
        )
    )
    assert 0.0 <= result.probability <= 1.0
    code, output = _cli(
        "evaluate",
        str(tmp_path / "mr/model.safetensors"),
        "--data",
        str(root),
        "--out",
        str(tmp_path / "eval"),
    )
    assert code == 0, output
    assert "Subjects (annotated ROI)" in (tmp_path / "eval/report.md").read_text()


@pytest.mark.parametrize("architecture", ["vgg16", "resnet101", "densenet121", "inception_v4"])
def test_comparison_architectures_have_a_one_logit_head(architecture: str, tmp_path: Path) -> None:
    from sijnode.models.architectures import build
    from sijnode.models.checkpoint import save_checkpoint
    from sijnode.models.spec import ct_spec

    spec = ct_spec(architecture=architecture, size=96)
    model = build(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 1)
    save_checkpoint(tmp_path / "m.safetensors", spec, model.state_dict())
    assert verify_checkpoint(tmp_path / "m.safetensors").architecture == architecture


def test_inception_needs_96_pixels(root: Path, tmp_path: Path) -> None:
    code, output = _cli(
        "train",
        "ct",
        "--data",
        str(root),
        "--out",
        str(tmp_path / "r"),
        "--compare",
        "--size",
        "64",
    )
    assert code != 0 and "Inception-v4 needs an input of at least 96 px" in output


def _class_counts(root: Path, modality: str, keep: int | None = None) -> tuple[int, int]:
    with (root / "labels.csv").open() as fh:
        rows = sorted(
            (r for r in csv.DictReader(fh) if r["modality"] == modality),
            key=lambda r: r["subject"],
        )[:keep]
    positive = sum(int(r["label"]) for r in rows)
    return positive, len(rows) - positive


def test_too_few_subjects_for_the_splits_is_refused_before_training(
    root: Path, tmp_path: Path
) -> None:
    """No raw scikit-learn error: the split named, what it needs and what was found."""
    from sijnode.errors import TrainingDataError
    from sijnode.training.splits import (
        holdout_split,
        repeated_subject_splits,
        stratified_group_folds,
    )

    pos, neg = _class_counts(root, "CT")
    code, output = _cli(
        "train", "ct", "--data", str(root), "--out", str(tmp_path / "ct"), "--folds", "10"
    )
    assert code == 1, output
    assert (
        f"10-fold cross-validation needs at least 10 subjects per class; found {pos} "
        f"positive, {neg} negative" in output
    )
    assert f"use --folds {min(pos, neg)} or fewer" in output
    assert "TrainingDataError" in output and not (tmp_path / "ct").exists()

    pos, neg = _class_counts(root, "CT", keep=3)
    code, output = _cli(
        "train", "ct", "--data", str(root), "--out", str(tmp_path / "ct1"), "--folds", "1",
        "--max-subjects", "3",
    )  # fmt: skip
    assert code == 1, output
    assert (
        "the 70:15:15 train/validation/test split needs at least 3 subjects per class; "
        f"found {pos} positive, {neg} negative" in output
    )
    assert not (tmp_path / "ct1").exists()

    pos, neg = _class_counts(root, "MR", keep=4)
    code, output = _cli(
        "train", "mr", "--data", str(root), "--out", str(tmp_path / "mr"), "--quick",
        "--max-subjects", "4",
    )  # fmt: skip
    assert code == 1, output
    assert (
        "the 70%/30% subject split needs at least 3 subjects per class; "
        f"found {pos} positive, {neg} negative" in output
    )
    assert not (tmp_path / "mr").exists()

    # The split functions themselves: 3 positive and 12 negative subjects, where
    # scikit-learn's StratifiedGroupKFold would only warn and leave folds with no positive.
    subjects = [f"s{i:02d}" for i in range(15)]
    labels = [int(i < 3) for i in range(15)]
    by_subject = dict(zip(subjects, labels, strict=True))
    with pytest.raises(TrainingDataError, match="found 3 positive, 12 negative"):
        stratified_group_folds(subjects, labels, n_splits=5)
    assert len(stratified_group_folds(subjects, labels, n_splits=3)) == 3
    two = dict(list(by_subject.items())[1:])  # 2 positive
    with pytest.raises(TrainingDataError, match="found 2 positive, 12 negative"):
        holdout_split(two)
    with pytest.raises(TrainingDataError, match="found 2 positive, 12 negative"):
        repeated_subject_splits(two)
    assert holdout_split(two, per_class=0).test  # the localiser has no classes


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ct_compare_runs_the_five_architectures_and_reports_table_1(
    root: Path, tmp_path: Path
) -> None:
    """``sijnode train ct --compare`` end to end at a tiny size: Table 1 layout for each of
    Fu et al. 2024's five networks, Fig. 4 curves, ROC per fold, the deployable export."""
    from sijnode.training.ct_study import COMPARISON, NAMES

    run = tmp_path / "cmp"
    code, output = _cli(
        "train", "ct", "--data", str(root), "--out", str(run), "--quick", "--quiet",
        "--compare", "--folds", "2", "--epochs", "1", "--size", "96", "--batch-size", "4",
    )  # fmt: skip
    assert code == 0, output
    report = (run / "report.md").read_text()
    header = "| Model | folds | Accuracy | AUC | Recall | F1 | Precision | Specificity |"
    tables = report.split(header)
    assert len(tables) == 3, report  # test slices, then studies
    for table in tables[1:]:
        rows = [line for line in table.strip().splitlines() if line.startswith("| ")]
        assert [r.split(" | ")[0][2:] for r in rows[:5]] == [NAMES[a] for a in COMPARISON]
        for row in rows[:5]:
            cells = [c.strip() for c in row.strip("| ").split(" | ")]
            assert cells[1] == "2"  # folds
            assert len(cells) == 8
            assert "±" in cells[2], row  # accuracy, mean ± sd over the 2 folds
    figures = ["plots/training_curves.png", "plots/training_loss.png", "plots/roc_holdout.png"]
    figures += [f"plots/roc_{a}.png" for a in COMPARISON]
    for png in figures:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report, png
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == sorted(
        [f"{a}-fold{k}" for a in COMPARISON for k in (1, 2)] + ["resnext50_32x4d-holdout"]
    )
    folds = json.loads((run / "results.json").read_text())["folds"]
    assert sorted(folds) == sorted(f"{a}-fold{k}" for a in COMPARISON for k in (1, 2))
    spec = verify_checkpoint(run / "model.safetensors", "ct_slice_classifier")
    assert spec.architecture == "resnext50_32x4d"  # the paper's best, which the node explains
    assert spec.operating_points.study_threshold is not None
    assert spec.training["protocol"].startswith("Fu et al. 2024")
    model, _ = load_model(run / "model.safetensors")
    assert model is not None
