"""Subject-disjoint, stratified splits of the two papers' protocols.

- CT (Fu et al. 2024): 70:15:15 train/validation/test, and stratified 10-fold
  cross-validation with results averaged over folds.
- MR (Lee et al. 2021): by subject, 70 % train and 30 % test, repeated 5 times; 30 % of the
  training subjects are held out for model selection.

No subject ever appears on both sides of a split: images are grouped by subject
(scikit-learn's ``StratifiedGroupKFold``; subject-level ``train_test_split`` stratified by
the subject label).

Too few subjects for a protocol are refused before any training starts, naming what the
split needs and what was found (:func:`require_per_class`): k-fold cross-validation needs
k subjects of each class (one of each in every test fold); the three-way holdout and the
MR repeats need 3 of each class (one for each of train, validation and test).
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


#: Subjects of each class the three-way splits need: one for each of train, validation, test.
MIN_PER_CLASS = 3


def class_counts(by_subject: dict[str, int]) -> tuple[int, int]:
    """(positive, negative) subjects."""
    positive = sum(1 for v in by_subject.values() if v)
    return positive, len(by_subject) - positive


def require_per_class(
    by_subject: dict[str, int], per_class: int, what: str, hint: str = ""
) -> None:
    """Refuse ``what`` unless each class has at least ``per_class`` subjects."""
    positive, negative = class_counts(by_subject)
    if min(positive, negative) < per_class:
        raise TrainingDataError(
            [
                f"{what} needs at least {per_class} subjects per class; found {positive} "
                f"positive, {negative} negative{hint}"
            ]
        )


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
    try:
        first, second = train_test_split(
            names, test_size=size, random_state=seed, stratify=stratify
        )
    except ValueError as exc:  # a safety net: the protocols check their minimums first
        raise TrainingDataError(
            [
                f"cannot split {len(names)} subjects ({int(counts[1])} positive, "
                f"{int(counts[0])} negative) {1 - size:.0%}/{size:.0%}: {exc}"
            ]
        ) from exc
    return sorted(first), sorted(second)


def holdout_split(
    by_subject: dict[str, int],
    fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
    seed: int = 0,
    per_class: int = MIN_PER_CLASS,
) -> Split:
    """Train/validation/test by subject, stratified by subject label (CT: 70:15:15).

    ``per_class`` 0 (the localiser, which has no classes) needs 3 subjects in all.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise TrainingDataError([f"split fractions must sum to 1, got {fractions}"])
    names = sorted(by_subject)
    if len(names) < 3:
        raise TrainingDataError([f"need at least 3 subjects for a 3-way split, got {len(names)}"])
    shares = ":".join(f"{round(100 * f)}" for f in fractions)
    require_per_class(
        by_subject,
        per_class,
        f"the {shares} train/validation/test split",
        " (one for each of train, validation and test)",
    )
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
    fewest = min(class_counts(by_subject))
    require_per_class(
        by_subject,
        n_splits,
        f"{n_splits}-fold cross-validation",
        f" (one of each class in every test fold): use --folds {fewest} or fewer, or more subjects"
        if fewest >= 2
        else " (one of each class in every test fold)",
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
    require_per_class(
        by_subject,
        MIN_PER_CLASS,
        f"the {1 - test_fraction:.0%}/{test_fraction:.0%} subject split",
        " (one for each of train, validation and test)",
    )
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
