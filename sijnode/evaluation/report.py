"""One report of diagnostic accuracy: point estimates with bootstrap intervals, the
confusion matrix, a calibration table and the Brier score (``audit metrics`` prints one
per group; the training tools one per fold and split)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sijnode.errors import EvaluationError
from sijnode.evaluation.accuracy import (
    METRIC_NAMES,
    CalibrationBin,
    Confusion,
    as_labels,
    as_scores,
    binary_metrics,
    calibration_table,
    confusion,
    roc_auc,
)
from sijnode.evaluation.bootstrap import bootstrap_metrics, percentile_interval


@dataclass(frozen=True)
class MetricEstimate:
    """A point estimate with its bootstrap interval."""

    name: str
    estimate: float
    ci_low: float
    ci_high: float


@dataclass
class MetricsReport:
    """Everything ``audit metrics`` reports for one group of cases (studies, subjects,
    slices): counts, estimates with intervals, confusion matrix, calibration."""

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
        known = ", ".join(m.name for m in self.metrics)
        raise EvaluationError(f"expected a metric of {known}, got {name!r}")

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
    t = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    s = as_scores(probabilities, t.size)
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
