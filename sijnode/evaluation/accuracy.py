"""Validation metrics in numpy: confusion-matrix metrics, ROC AUC, calibration, and
percentile bootstrap confidence intervals.

Definitions (TP, FP, TN, FN from the recorded labels against the reference):
accuracy (TP+TN)/n, sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP),
NPV TN/(TN+FN), F1 2TP/(2TP+FP+FN). ROC AUC is the Mann–Whitney statistic: the
probability that a random positive scores above a random negative, ties counting one
half (Hanley & McNeil 1982, doi:10.1148/radiology.143.1.7063747). A metric whose
denominator is zero is undefined (NaN, printed empty). Confidence intervals are
percentile bootstrap intervals over studies (Efron & Tibshirani 1993, ch. 13).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Metric names in report order.
METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc")


def _as_bool(values: Any, name: str) -> BoolArray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d array for {name}, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"expected only 0/1 in {name}, got {np.unique(arr)[:5]!r}")
        arr = arr.astype(bool)
    return arr


def _as_scores(values: Any, n: int) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"expected {n} scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("expected finite scores, got NaN or infinity")
    return arr


def _ratio(num: Any, den: Any) -> Any:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _from_counts(tp: Any, fp: Any, tn: Any, fn: Any) -> dict[str, Any]:
    n = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
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
    t = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"expected y_true and y_pred of one length, got {t.size} and {p.size}")
    return Confusion(
        tp=int(np.sum(t & p)),
        fp=int(np.sum(~t & p)),
        tn=int(np.sum(~t & ~p)),
        fn=int(np.sum(t & ~p)),
    )


def binary_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 (NaN where undefined)."""
    c = confusion(y_true, y_pred)
    return {k: float(v) for k, v in _from_counts(c.tp, c.fp, c.tn, c.fn).items()}


def roc_auc(y_true: Any, scores: Any) -> float:
    """ROC AUC by the Mann–Whitney rank statistic with mid-ranks for ties."""
    t = _as_bool(y_true, "y_true")
    s = _as_scores(scores, t.size)
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
    t = _as_bool(y_true, "y_true")
    s = _as_scores(scores, t.size)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    t_sorted = t[order]
    last = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), t.size - 1]
    tps = np.cumsum(t_sorted)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    fpr = np.r_[0.0, _ratio(fps, float((~t).sum()))]
    tpr = np.r_[0.0, _ratio(tps, float(t.sum()))]
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
        raise ValueError(f"expected at least 1 calibration bin, got {n_bins}")
    t = _as_bool(y_true, "y_true")
    p = _as_scores(probabilities, t.size)
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


def _bootstrap_auc(counts: Any, t_sorted: BoolArray, group_starts: Any) -> FloatArray:
    """AUC for each row of resample ``counts`` (cases sorted by score ascending)."""
    pos = np.add.reduceat(counts * t_sorted, group_starts, axis=1).astype(np.float64)
    neg = np.add.reduceat(counts * ~t_sorted, group_starts, axis=1).astype(np.float64)
    below = np.cumsum(neg, axis=1) - neg
    w1 = pos.sum(axis=1)
    w0 = neg.sum(axis=1)
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.asarray(_ratio(num, w1 * w0), dtype=np.float64)


def bootstrap_metrics(
    y_true: Any,
    y_pred: Any,
    scores: Any,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    chunk: int = 250,
) -> dict[str, FloatArray]:
    """Every metric on ``n_resamples`` resamples of the cases (with replacement).

    Seeded, so the same data give the same intervals. Resamples are counted per case
    (a multinomial draw), which lets the AUC of each resample be computed from the
    cases' tie groups without re-sorting.
    """
    if n_resamples < 1:
        raise ValueError(f"expected at least 1 bootstrap resample, got {n_resamples}")
    t = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred")
    s = _as_scores(scores, t.size)
    n = t.size
    order = np.argsort(s, kind="mergesort")
    t_sorted, p_sorted, s_sorted = t[order], p[order], s[order]
    # Resample i draws case indices idx[i] from the generator; its counts are then
    # permuted into score order for the tie-group sums of the AUC.
    group_starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    rng = np.random.default_rng(seed)
    results: dict[str, list[FloatArray]] = {name: [] for name in METRIC_NAMES}
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n)) if n else np.zeros((b, 0), dtype=np.int64)
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n).reshape(b, n)[:, order]
        tp = counts @ (t_sorted & p_sorted)
        fp = counts @ (~t_sorted & p_sorted)
        tn = counts @ (~t_sorted & ~p_sorted)
        fn = counts @ (t_sorted & ~p_sorted)
        for name, values in _from_counts(tp, fp, tn, fn).items():
            results[name].append(np.asarray(values, dtype=np.float64))
        if n:
            results["roc_auc"].append(_bootstrap_auc(counts, t_sorted, group_starts))
        else:
            results["roc_auc"].append(np.full(b, np.nan))
        done += b
    return {name: np.concatenate(parts) for name, parts in results.items()}


def percentile_interval(values: Any, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values`` (NaN resamples left out)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"expected a confidence level between 0 and 1, got {confidence}")
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(arr, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


@dataclass(frozen=True)
class MetricEstimate:
    """A point estimate with its bootstrap interval."""

    name: str
    estimate: float
    ci_low: float
    ci_high: float


@dataclass
class MetricsReport:
    """Everything ``audit metrics`` reports for one group of studies."""

    group: str
    n: int
    positives: int
    negatives: int
    confusion: Confusion
    metrics: list[MetricEstimate]
    calibration: list[CalibrationBin]
    brier: float
    confidence: float
    n_resamples: int
    seed: int

    def metric(self, name: str) -> MetricEstimate:
        """The estimate called ``name``."""
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None when rendered)."""
        return {
            "group": self.group,
            "n": self.n,
            "positives": self.positives,
            "negatives": self.negatives,
            "confusion": {
                "tp": self.confusion.tp,
                "fp": self.confusion.fp,
                "tn": self.confusion.tn,
                "fn": self.confusion.fn,
            },
            "metrics": {
                m.name: {"estimate": m.estimate, "ci_low": m.ci_low, "ci_high": m.ci_high}
                for m in self.metrics
            },
            "brier": self.brier,
            "calibration": [vars(b) for b in self.calibration],
            "confidence": self.confidence,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
        }


def evaluate(
    y_true: Sequence[bool] | Any,
    y_pred: Sequence[bool] | Any,
    probabilities: Sequence[float] | Any,
    *,
    group: str = "all",
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 10,
) -> MetricsReport:
    """Point estimates, bootstrap intervals, confusion matrix and calibration table."""
    t = _as_bool(y_true, "y_true")
    p = _as_bool(y_pred, "y_pred")
    s = _as_scores(probabilities, t.size)
    c = confusion(t, p)
    points = binary_metrics(t, p)
    points["roc_auc"] = roc_auc(t, s)
    boot = bootstrap_metrics(t, p, s, n_resamples=n_resamples, seed=seed)
    estimates = []
    for name in METRIC_NAMES:
        low, high = percentile_interval(boot[name], confidence)
        if math.isnan(points[name]):
            low = high = math.nan
        estimates.append(MetricEstimate(name, points[name], low, high))
    brier = float(np.mean((s - t) ** 2)) if t.size else math.nan
    return MetricsReport(
        group=group,
        n=int(t.size),
        positives=int(t.sum()),
        negatives=int((~t).sum()),
        confusion=c,
        metrics=estimates,
        calibration=calibration_table(t, s, n_bins),
        brier=brier,
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
