"""Diagnostic accuracy in numpy: confusion-matrix metrics, ROC AUC, the ROC curve and
calibration, from reference labels and predicted labels or scores.

Definitions (TP, FP, TN, FN from the predicted labels against the reference):
accuracy (TP+TN)/n, sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP),
NPV TN/(TN+FN), F1 2TP/(2TP+FP+FN). ROC AUC is the Mann–Whitney statistic: the
probability that a random positive scores above a random negative, ties counting one
half (Hanley & McNeil 1982, doi:10.1148/radiology.143.1.7063747). A metric whose
denominator is zero is undefined (NaN, printed empty). Precision is PPV and recall is
sensitivity (the MR paper's names, Lee et al. 2021). A score at or above the threshold is
positive. Intervals are in :mod:`sijnode.evaluation.bootstrap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from sijnode.errors import EvaluationError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Metric names in report order.
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc")


def as_labels(values: Any, name: str = "labels") -> BoolArray:
    """``values`` as a 1-d boolean array: bools or 0/1, anything else is an error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise EvaluationError(f"expected a 1-d array for {name}, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise EvaluationError(f"expected only 0/1 in {name}, got {np.unique(arr)[:5]!r}")
        arr = arr.astype(bool)
    return arr


def as_scores(values: Any, n: int) -> FloatArray:
    """``values`` as ``n`` finite float scores; anything else is an error."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise EvaluationError(f"expected {n} scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise EvaluationError("expected finite scores, got NaN or infinity")
    return arr


def safe_ratio(num: Any, den: Any) -> Any:
    """``num / den`` elementwise, NaN where ``den`` is 0 (an undefined metric)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def from_counts(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 of counts (scalars or arrays of
    one shape; NaN where undefined)."""
    n = tp + fp + tn + fn
    return {
        "accuracy": safe_ratio(tp + tn, n),
        "sensitivity": safe_ratio(tp, tp + fn),
        "specificity": safe_ratio(tn, tn + fp),
        "ppv": safe_ratio(tp, tp + fp),
        "npv": safe_ratio(tn, tn + fn),
        "f1": safe_ratio(2 * tp, 2 * tp + fp + fn),
    }


@dataclass(frozen=True)
class Confusion:
    """The 2×2 confusion matrix."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        """Number of cases."""
        return self.tp + self.fp + self.tn + self.fn


def confusion(y_true: Any, y_pred: Any) -> Confusion:
    """Count TP, FP, TN, FN."""
    t = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise EvaluationError(
            f"expected y_true and y_pred of one length, got {t.size} and {p.size}"
        )
    return Confusion(
        tp=int(np.sum(t & p)),
        fp=int(np.sum(~t & p)),
        tn=int(np.sum(~t & ~p)),
        fn=int(np.sum(t & ~p)),
    )


def binary_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 (NaN where undefined)."""
    c = confusion(y_true, y_pred)
    return {k: float(v) for k, v in from_counts(c.tp, c.fp, c.tn, c.fn).items()}


def roc_auc(y_true: Any, scores: Any) -> float:
    """ROC AUC by the Mann–Whitney rank statistic with mid-ranks for ties."""
    t = as_labels(y_true, "y_true")
    s = as_scores(scores, t.size)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(t.size, dtype=np.float64)
    # Mid-ranks: every member of a tie group gets the mean of the group's ranks.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], t.size]
    mid = (starts + ends + 1) / 2.0  # ranks are 1-based: mean of start+1 .. end
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: Any, scores: Any) -> tuple[FloatArray, FloatArray, FloatArray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    t = as_labels(y_true, "y_true")
    s = as_scores(scores, t.size)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    t_sorted = t[order]
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), t.size - 1]
    tps = np.cumsum(t_sorted)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    fpr = np.r_[0.0, safe_ratio(fps, float((~t).sum()))]
    tpr = np.r_[0.0, safe_ratio(tps, float(t.sum()))]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of predicted probability: how many, mean predicted, fraction positive."""

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_fraction: float


def calibration_table(y_true: Any, probabilities: Any, n_bins: int = 10) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1]; the last bin includes 1. Empty bins have NaN means."""
    if n_bins < 1:
        raise EvaluationError(f"expected at least 1 calibration bin, got {n_bins}")
    t = as_labels(y_true, "y_true")
    p = as_scores(probabilities, t.size)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        mask = index == b
        count = int(mask.sum())
        out.append(
            CalibrationBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                count=count,
                mean_predicted=float(p[mask].mean()) if count else math.nan,
                observed_fraction=float(t[mask].mean()) if count else math.nan,
            )
        )
    return out


def labels_at(scores: Any, threshold: float) -> BoolArray:
    """Predicted labels: positive where the score is at or above ``threshold``."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise EvaluationError(f"expected a 1-d array of scores, got shape {s.shape}")
    return as_scores(s, s.size) >= threshold


@dataclass(frozen=True)
class Accuracy:
    """Diagnostic accuracy of scores against reference labels at one threshold."""

    threshold: float
    confusion: Confusion
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    roc_auc: float

    @property
    def precision(self) -> float:
        """Precision, the positive predictive value."""
        return self.ppv

    @property
    def recall(self) -> float:
        """Recall, the sensitivity."""
        return self.sensitivity

    def as_dict(self) -> dict[str, float]:
        """The metrics by :data:`METRIC_NAMES`."""
        return {name: float(getattr(self, name)) for name in METRIC_NAMES}


def accuracy_at_threshold(y_true: Any, scores: Any, threshold: float = 0.5) -> Accuracy:
    """Every metric of :data:`METRIC_NAMES` for ``scores`` thresholded at ``threshold``
    (positive at or above it); ROC AUC uses the scores themselves."""
    t = as_labels(y_true, "y_true")
    s = as_scores(scores, t.size)
    predicted = s >= threshold
    points = binary_metrics(t, predicted)
    return Accuracy(
        threshold=float(threshold),
        confusion=confusion(t, predicted),
        roc_auc=roc_auc(t, s),
        **points,
    )
