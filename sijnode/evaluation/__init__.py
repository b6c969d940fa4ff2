"""Diagnostic accuracy from labels and scores: the audit's ``audit metrics`` and the
training tools use the same functions. Imports nothing from the audit or the database.

- :mod:`~sijnode.evaluation.accuracy`: confusion matrix; accuracy, sensitivity (recall),
  specificity, PPV (precision), NPV, F1, ROC AUC, at a threshold; ROC curve; calibration.
- :mod:`~sijnode.evaluation.bootstrap`: percentile bootstrap intervals of every metric.
- :mod:`~sijnode.evaluation.report`: one report (estimates, intervals, confusion, calibration).
- :mod:`~sijnode.evaluation.folds`: mean ± sd over cross-validation folds.
- :mod:`~sijnode.evaluation.plots`: ROC and calibration plots as PNG (imports matplotlib,
  so it is not re-exported here).
"""

from sijnode.evaluation.accuracy import (
    METRIC_NAMES,
    Accuracy,
    CalibrationBin,
    Confusion,
    accuracy_at_threshold,
    binary_metrics,
    calibration_table,
    confusion,
    labels_at,
    roc_auc,
    roc_curve,
)
from sijnode.evaluation.bootstrap import bootstrap_intervals, bootstrap_metrics, percentile_interval
from sijnode.evaluation.folds import MeanSd, mean_sd, summarise_folds
from sijnode.evaluation.report import MetricEstimate, MetricsReport, evaluate

__all__ = [
    "METRIC_NAMES",
    "Accuracy",
    "CalibrationBin",
    "Confusion",
    "MeanSd",
    "MetricEstimate",
    "MetricsReport",
    "accuracy_at_threshold",
    "binary_metrics",
    "bootstrap_intervals",
    "bootstrap_metrics",
    "calibration_table",
    "confusion",
    "evaluate",
    "labels_at",
    "mean_sd",
    "percentile_interval",
    "roc_auc",
    "roc_curve",
    "summarise_folds",
]
