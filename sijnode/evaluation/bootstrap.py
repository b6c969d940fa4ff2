"""Percentile bootstrap confidence intervals of the diagnostic accuracy metrics.

Cases are resampled with replacement (Efron & Tibshirani 1993, ch. 13); every metric of
:data:`~sijnode.evaluation.accuracy.METRIC_NAMES` is computed on each resample and the
interval is the percentile interval of the resampled values (NaN resamples left out).
Seeded: the same data and seed give the same intervals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sijnode.errors import EvaluationError
from sijnode.evaluation.accuracy import (
    METRIC_NAMES,
    BoolArray,
    FloatArray,
    as_labels,
    as_scores,
    from_counts,
    safe_ratio,
)


def _bootstrap_auc(counts: Any, t_sorted: BoolArray, group_starts: Any) -> FloatArray:
    """AUC for each row of resample ``counts`` (cases sorted by score ascending)."""
    pos = np.add.reduceat(counts * t_sorted, group_starts, axis=1).astype(np.float64)
    neg = np.add.reduceat(counts * ~t_sorted, group_starts, axis=1).astype(np.float64)
    below = np.cumsum(neg, axis=1) - neg
    w1 = pos.sum(axis=1)
    w0 = neg.sum(axis=1)
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.asarray(safe_ratio(num, w1 * w0), dtype=np.float64)


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
        raise EvaluationError(f"expected at least 1 bootstrap resample, got {n_resamples}")
    t = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    s = as_scores(scores, t.size)
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
        for name, values in from_counts(tp, fp, tn, fn).items():
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
        raise EvaluationError(f"expected a confidence level between 0 and 1, got {confidence}")
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(arr, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_intervals(
    y_true: Any,
    y_pred: Any,
    scores: Any,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """The percentile interval of every metric, by name (NaN, NaN where undefined)."""
    boot = bootstrap_metrics(y_true, y_pred, scores, n_resamples=n_resamples, seed=seed)
    return {name: percentile_interval(boot[name], confidence) for name in METRIC_NAMES}
