"""Subject-disjoint, stratified splits of the two papers' protocols.

- CT (Fu et al. 2024): 70:15:15 train/validation/test, and stratified 10-fold
  cross-validation with results averaged over folds.
- MR (Lee et al. 2021): by subject, 70 % train and 30 % test, repeated 5 times; 30 % of the
  training subjects are held out for model selection.

No subject ever appears on both sides of a split: images are grouped by subject
(scikit-learn's ``StratifiedGroupKFold``; subject-level ``train_test_split`` stratified by
the subject label).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from sijnode.errors import TrainingDataError


@dataclass(frozen=True)
class Split:
    """Subjects of one fold or repeat (each tuple sorted, all three disjoint)."""

    name: str
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "train": list(self.train),
            "validation": list(self.validation),
            "test": list(self.test),
        }


def subject_labels(subjects: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """One label per subject: positive when any of its items is positive."""
    out: dict[str, int] = {}
    for subject, label in zip(subjects, labels, strict=True):
        out[subject] = max(out.get(subject, 0), int(label))
    return out


def _stratified_subjects(
    names: list[str], y: list[int], size: float, seed: int
) -> tuple[list[str], list[str]]:
    counts = np.bincount(np.asarray(y, dtype=int), minlength=2)
    n_second = math.ceil(size * len(names))  # scikit-learn rounds the test share up
    classes = int((counts > 0).sum())
    # Stratify where scikit-learn can: two of each class, and room for each on both sides.
    feasible = counts.min() >= 2 and min(n_second, len(names) - n_second) >= classes
    stratify = y if feasible else None
    first, second = train_test_split(names, test_size=size, random_state=seed, stratify=stratify)
    return sorted(first), sorted(second)


def holdout_split(
    by_subject: dict[str, int],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> Split:
    """Train/validation/test by subject, stratified by subject label (CT: 70:15:15)."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise TrainingDataError([f"split fractions must sum to 1, got {fractions}"])
    names = sorted(by_subject)
    if len(names) < 3:
        raise TrainingDataError([f"need at least 3 subjects for a 3-way split, got {len(names)}"])
    rest, test = _stratified_subjects(names, [by_subject[n] for n in names], fractions[2], seed)
    val_share = fractions[1] / (fractions[0] + fractions[1])
    train, val = _stratified_subjects(rest, [by_subject[n] for n in rest], val_share, seed + 1)
    return Split("holdout", tuple(train), tuple(val), tuple(test))


def stratified_group_folds(
    subjects: Sequence[str],
    labels: Sequence[int],
    n_splits: int = 10,
    validation_fraction: float = 0.15,
    seed: int = 0,
) -> list[Split]:
    """Stratified k-fold over items grouped by subject (CT: 10 folds).

    Each fold's test subjects come from ``StratifiedGroupKFold``; a stratified share of the
    remaining subjects is held out for validation (model selection, thresholds).
    """
    by_subject = subject_labels(subjects, labels)
    if len(by_subject) < n_splits:
        raise TrainingDataError(
            [
                f"{n_splits}-fold cross-validation needs at least {n_splits} subjects, got "
                f"{len(by_subject)}"
            ]
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    groups = np.asarray(subjects)
    out: list[Split] = []
    for index, (rest_idx, test_idx) in enumerate(
        folds.split(np.zeros(len(labels)), np.asarray(labels), groups)
    ):
        test = sorted(set(groups[test_idx]))
        rest = sorted(set(groups[rest_idx]))
        train, val = _stratified_subjects(
            rest, [by_subject[n] for n in rest], validation_fraction, seed + index
        )
        out.append(Split(f"fold{index + 1}", tuple(train), tuple(val), tuple(test)))
    return out


def repeated_subject_splits(
    by_subject: dict[str, int],
    repeats: int = 5,
    test_fraction: float = 0.30,
    validation_fraction: float = 0.30,
    seed: int = 0,
) -> list[Split]:
    """MR (Lee et al. 2021 §2.4): 70/30 by subject, repeated; 30 % of train for validation."""
    names = sorted(by_subject)
    out: list[Split] = []
    for repeat in range(repeats):
        rest, test = _stratified_subjects(
            names, [by_subject[n] for n in names], test_fraction, seed + 100 * repeat
        )
        train, val = _stratified_subjects(
            rest, [by_subject[n] for n in rest], validation_fraction, seed + 100 * repeat + 1
        )
        out.append(Split(f"repeat{repeat + 1}", tuple(train), tuple(val), tuple(test)))
    return out
