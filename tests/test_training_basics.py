"""Training building blocks: data checks, subject-disjoint stratified splits, focal loss,
cosine schedule and the papers' augmentations (against their formulas and scikit-learn)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sijnode.errors import TrainingDataError
from sijnode.synth import generate_dataset, write_dataset
from sijnode.training.augment import ct_augmentation, mr_augmentation
from sijnode.training.data import load_dataset
from sijnode.training.losses import cosine_schedule, focal_loss
from sijnode.training.splits import (
    holdout_split,
    repeated_subject_splits,
    stratified_group_folds,
    subject_labels,
)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, generate_dataset(seed=3, n_subjects=4, positive_fraction=0.5, n_slices=6))
    return root


def test_load_dataset_reads_synth_output(synth_root: Path) -> None:
    ct = load_dataset(synth_root, "CT")
    mr = load_dataset(synth_root, "MR", need_rois=True)
    assert len(ct) == 4 and len(mr) == 4
    assert {s.label for s in ct} == {0, 1}
    for study in mr:
        numbers = [s.instance_number for s in study.slices]
        assert numbers == sorted(numbers)
        assert all({b.side for b in s.rois} == {"left", "right"} for s in study.slices)
        assert study.has_slice_labels


def _rewrite(path: Path, edit: object) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    rows = edit(rows)  # type: ignore[operator]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)


def test_bad_input_is_reported_with_line_and_reason(synth_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(synth_root, root)

    def break_labels(rows: list[dict[str, str]]) -> list[dict[str, str]]:
        rows[0]["slice_labels"] = rows[0]["slice_labels"] + "1"  # wrong length
        rows[1]["SeriesInstanceUID"] = "1.2.3.4"  # matches no series
        return rows

    _rewrite(root / "labels.csv", break_labels)
    _rewrite(  # one slice of sub-0003's MR loses its left box
        root / "rois.csv",
        lambda rows: [
            r
            for r in rows
            if not (
                r["subject"] == "sub-0003" and r["InstanceNumber"] == "3" and r["side"] == "left"
            )
        ],
    )
    first_file = sorted((root / "sub-0002" / "mr").iterdir())[0]
    first_file.write_bytes(b"not dicom")
    with pytest.raises(TrainingDataError) as info:
        load_dataset(root, "MR", need_rois=True)
    text = str(info.value)
    with pytest.raises(TrainingDataError) as info_ct:
        load_dataset(root, "CT")
    text += str(info_ct.value)
    assert "labels.csv:2: slice_labels has" in text
    assert "labels.csv:3: label matches no series" in text
    assert "missing ROI box(es)" in text
    assert f"{first_file}: unreadable DICOM file" in text


def test_a_class_without_examples_is_refused(synth_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "one-class"
    shutil.copytree(synth_root, root)
    _rewrite(root / "labels.csv", lambda rows: [r for r in rows if r["label"] == "1"])
    with pytest.raises(TrainingDataError, match="no CT study with label 0"):
        load_dataset(root, "CT")


def _items(n_subjects: int, per_subject: int, seed: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    subjects, labels = [], []
    for i in range(n_subjects):
        positive = int(i % 3 == 0)
        for _ in range(per_subject):
            subjects.append(f"s{i:03d}")
            labels.append(int(positive and rng.random() < 0.8))
    return subjects, labels


def test_ten_folds_are_subject_disjoint_and_stratified() -> None:
    subjects, labels = _items(60, 5, seed=1)
    folds = stratified_group_folds(subjects, labels, n_splits=10, seed=0)
    assert len(folds) == 10
    all_subjects = set(subjects)
    tested: list[str] = []
    overall = np.mean(labels)
    for fold in folds:
        train, val, test = set(fold.train), set(fold.validation), set(fold.test)
        assert not train & val and not train & test and not val & test
        assert train | val | test == all_subjects
        tested.extend(fold.test)
        fold_rate = np.mean([lab for s, lab in zip(subjects, labels, strict=True) if s in test])
        assert abs(fold_rate - overall) < 0.2
    assert sorted(tested) == sorted(all_subjects)  # every subject tested exactly once


def test_holdout_and_repeated_splits_by_subject() -> None:
    subjects, labels = _items(40, 3, seed=2)
    by_subject = subject_labels(subjects, labels)
    split = holdout_split(by_subject, seed=4)
    assert len(split.test) == 6 and len(split.validation) == 6 and len(split.train) == 28
    assert not set(split.train) & set(split.test)
    for part in (split.train, split.test):
        rate = np.mean([by_subject[s] for s in part])
        assert abs(rate - np.mean(list(by_subject.values()))) < 0.2
    repeats = repeated_subject_splits(by_subject, repeats=5, seed=1)
    assert len(repeats) == 5
    assert len({r.test for r in repeats}) > 1  # the repeats differ
    for r in repeats:
        assert len(r.test) == 12
        assert not (set(r.train) | set(r.validation)) & set(r.test)
        assert not set(r.train) & set(r.validation)


def test_focal_loss_matches_its_formula() -> None:
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    gamma, alpha = 2.0, 0.25
    expected = []
    for z, y in zip(logits.tolist(), targets.tolist(), strict=True):
        p = 1 / (1 + math.exp(-z))
        p_t = p if y == 1 else 1 - p
        a_t = alpha if y == 1 else 1 - alpha
        expected.append(-a_t * (1 - p_t) ** gamma * math.log(p_t))
    got = focal_loss(logits, targets, gamma=gamma, alpha=alpha, reduction="none")
    assert np.allclose(got.numpy(), expected, rtol=1e-10)
    assert float(focal_loss(logits, targets, gamma=0, alpha=None)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(logits, targets))
    )


def test_cosine_schedule_matches_its_formula() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.03)
    sched = cosine_schedule(opt, total_steps=50)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.03 * (1 + math.cos(math.pi * t / 50)) / 2 for t in range(50)]
    assert np.allclose(seen, expected, atol=1e-12)


def test_augmentations_are_the_papers_and_seeded() -> None:
    names_ct = [type(t).__name__ for t in ct_augmentation(32, 0).transforms]
    assert names_ct[:3] == ["VerticalFlip", "RandomFog", "RandomBrightnessContrast"]
    assert "Rotate" in names_ct and "RGBShift" in names_ct
    names_mr = [type(t).__name__ for t in mr_augmentation(0).transforms]
    assert names_mr == ["HorizontalFlip", "Rotate"]
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    a = ct_augmentation(32, 5)(image=img)["image"]
    b = ct_augmentation(32, 5)(image=img)["image"]
    assert a.shape == img.shape and np.array_equal(a, b)
