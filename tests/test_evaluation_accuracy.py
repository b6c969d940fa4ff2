"""Diagnostic accuracy: the numpy implementation against scikit-learn on random data with
ties, the bootstrap, reports, mean ± sd over folds and the plots (no database)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from sijnode.errors import EvaluationError, SijnodeError
from sijnode.evaluation.accuracy import (
    METRIC_NAMES,
    accuracy_at_threshold,
    binary_metrics,
    calibration_table,
    confusion,
    labels_at,
    roc_auc,
    roc_curve,
)
from sijnode.evaluation.bootstrap import (
    bootstrap_intervals,
    bootstrap_metrics,
    percentile_interval,
)
from sijnode.evaluation.folds import mean_sd, summarise_folds
from sijnode.evaluation.plots import RocSeries, write_calibration_png, write_roc_png
from sijnode.evaluation.report import evaluate


def _random(seed: int, n: int, decimals: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n).astype(bool)
    truth[:2] = [True, False]  # both classes present
    scores = np.round(np.clip(rng.normal(0.4 + 0.2 * truth, 0.25), 0, 1), decimals)  # ties
    scores[1] = scores[0]  # at least one tie between a positive and a negative
    return truth, scores >= 0.5, scores


def _sklearn(truth: np.ndarray, pred: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    kw = {"zero_division": np.nan}
    return {
        "accuracy": skm.accuracy_score(truth, pred),
        "sensitivity": skm.recall_score(truth, pred, **kw),
        "specificity": skm.recall_score(truth, pred, pos_label=0, **kw),
        "ppv": skm.precision_score(truth, pred, **kw),
        "npv": skm.precision_score(truth, pred, pos_label=0, **kw),
        "f1": skm.f1_score(truth, pred, **kw),
        "roc_auc": skm.roc_auc_score(truth, scores),
    }


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [5, 37, 400])
def test_metrics_match_sklearn(seed: int, n: int) -> None:
    truth, pred, scores = _random(seed, n)
    assert len(np.unique(scores)) < n  # there are ties
    ours = binary_metrics(truth, pred)
    ours["roc_auc"] = roc_auc(truth, scores)
    theirs = _sklearn(truth, pred, scores)
    for name in METRIC_NAMES:
        if math.isnan(theirs[name]):
            assert math.isnan(ours[name]), name
        else:
            assert ours[name] == pytest.approx(theirs[name], abs=1e-12), name
    c = confusion(truth, pred)
    tn, fp, fn, tp = skm.confusion_matrix(truth, pred, labels=[False, True]).ravel()
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_matches_sklearn(seed: int) -> None:
    truth, _, scores = _random(seed, 60)
    fpr, tpr, thresholds = roc_curve(truth, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(truth, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(truth, scores))


def test_calibration_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    prob = rng.random(500)  # continuous: no value on a bin edge
    truth = rng.random(500) < prob
    bins = calibration_table(truth, prob, n_bins=10)
    frac, mean = calibration_curve(truth, prob, n_bins=10, strategy="uniform")
    full = [b for b in bins if b.count]
    np.testing.assert_allclose([b.observed_fraction for b in full], frac)
    np.testing.assert_allclose([b.mean_predicted for b in full], mean)
    assert sum(b.count for b in bins) == 500
    assert calibration_table([True], [1.0], n_bins=4)[-1].count == 1  # 1.0 is in the last bin


def test_undefined_metrics_are_nan() -> None:
    report = evaluate([False, False, False], [False, True, False], [0.1, 0.6, 0.2], n_resamples=50)
    assert math.isnan(report.metric("sensitivity").estimate)
    assert math.isnan(report.metric("roc_auc").estimate)
    assert math.isnan(report.metric("roc_auc").ci_low)
    assert report.metric("specificity").estimate == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="only 0/1"):
        binary_metrics([0, 2], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_bootstrap_equals_direct_resampling() -> None:
    truth, pred, scores = _random(11, 30)
    boot = bootstrap_metrics(truth, pred, scores, n_resamples=20, seed=5, chunk=7)
    rng = np.random.default_rng(5)
    draws = np.concatenate([rng.integers(0, 30, size=(b, 30)) for b in (7, 7, 6)])
    for i, idx in enumerate(draws):
        direct = binary_metrics(truth[idx], pred[idx])
        direct["roc_auc"] = roc_auc(truth[idx], scores[idx])
        for name in METRIC_NAMES:
            if math.isnan(direct[name]):
                assert math.isnan(boot[name][i])
            else:
                assert boot[name][i] == pytest.approx(direct[name], abs=1e-12), (i, name)


@pytest.mark.parametrize("seed", range(5))
def test_interval_contains_estimate_and_is_seeded(seed: int) -> None:
    truth, pred, scores = _random(seed, 150, decimals=2)
    report = evaluate(truth, pred, scores, n_resamples=2000, seed=seed)
    for m in report.metrics:
        assert m.ci_low <= m.estimate <= m.ci_high, m
        assert m.ci_high - m.ci_low < 0.35, m
    again = evaluate(truth, pred, scores, n_resamples=2000, seed=seed)
    other = evaluate(truth, pred, scores, n_resamples=2000, seed=seed + 100)
    assert again.metrics == report.metrics
    assert other.metric("roc_auc").ci_low != report.metric("roc_auc").ci_low
    assert report.confusion.n == report.n == 150
    assert report.brier == pytest.approx(skm.brier_score_loss(truth, scores))


def test_percentile_interval() -> None:
    values = np.arange(1001, dtype=float)
    assert percentile_interval(values, 0.95) == pytest.approx((25.0, 975.0))
    assert percentile_interval([np.nan, 1.0, np.nan], 0.9) == (1.0, 1.0)
    assert all(math.isnan(v) for v in percentile_interval([np.nan], 0.95))
    with pytest.raises(ValueError, match="confidence"):
        percentile_interval(values, 1.5)


# --------------------------------------------------------------------------- the API for training


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_accuracy_at_threshold_matches_sklearn(seed: int, threshold: float) -> None:
    truth, _, scores = _random(seed, 80, decimals=2)
    result = accuracy_at_threshold(truth, scores, threshold)
    predicted = scores >= threshold
    np.testing.assert_array_equal(labels_at(scores, threshold), predicted)
    kw = {"zero_division": np.nan}
    assert result.precision == pytest.approx(skm.precision_score(truth, predicted, **kw))
    assert result.recall == pytest.approx(skm.recall_score(truth, predicted, **kw))
    assert result.as_dict() == pytest.approx(_sklearn(truth, predicted, scores), nan_ok=True)
    assert list(result.as_dict()) == list(METRIC_NAMES)
    tn, fp, fn, tp = skm.confusion_matrix(truth, predicted, labels=[False, True]).ravel()
    assert (result.confusion.tp, result.confusion.fp, result.confusion.tn) == (tp, fp, tn)
    assert result.confusion.fn == fn and result.threshold == threshold


def test_bootstrap_intervals_are_the_percentiles_of_the_resamples() -> None:
    truth, pred, scores = _random(2, 60)
    intervals = bootstrap_intervals(truth, pred, scores, n_resamples=300, seed=9, confidence=0.9)
    boot = bootstrap_metrics(truth, pred, scores, n_resamples=300, seed=9)
    assert list(intervals) == list(METRIC_NAMES)
    for name, (low, high) in intervals.items():
        assert (low, high) == percentile_interval(boot[name], 0.9), name
        assert low <= high


def test_mean_sd_over_folds() -> None:
    folds = [
        accuracy_at_threshold(*_random(seed, 50, decimals=2)[::2], 0.5).as_dict()
        for seed in range(5)
    ]
    summary = summarise_folds(folds)
    assert list(summary) == list(METRIC_NAMES)
    for name, value in summary.items():
        values = [fold[name] for fold in folds]
        assert value.n == 5
        assert value.mean == pytest.approx(statistics.fmean(values)), name
        assert value.sd == pytest.approx(statistics.stdev(values)), name  # sample sd
    # The MR paper's layout: percentages with two decimals.
    assert mean_sd([0.90, 0.94, 0.95]).format(scale=100) == "93.00 ± 2.65"  # sd √7
    undefined = mean_sd([0.5, math.nan])  # a fold whose metric is undefined is left out
    assert (undefined.mean, undefined.n) == (0.5, 1) and math.isnan(undefined.sd)
    assert mean_sd([]).format() == ""
    assert mean_sd([0.2, 0.4], ddof=0).sd == pytest.approx(0.1)
    with pytest.raises(ValueError, match="expected 'f1' in every fold"):
        summarise_folds([{"f1": 0.5}, {"auc": 0.7}])
    with pytest.raises(ValueError, match="at least one fold"):
        summarise_folds([])


def test_plots_from_plain_data(tmp_path: Path) -> None:
    truth, pred, scores = _random(4, 40)
    roc = write_roc_png(
        [
            RocSeries("fold 1", truth, scores, (0.6, 0.9)),
            RocSeries("fold 2", truth[::-1], scores),
            RocSeries("one class", [True, True], [0.2, 0.9]),  # no curve, no error
        ],
        tmp_path / "roc" / "roc.png",
    )
    report = evaluate(truth, pred, scores, group="fold 1", n_resamples=50)
    calibration = write_calibration_png([report], tmp_path / "cal.png")
    for path in (roc, calibration):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: binary_metrics([0, 2], [0, 1]), "only 0/1"),
        (lambda: roc_auc([0, 1], [0.1, float("nan")]), "finite"),
        (lambda: confusion([0, 1], [0, 1, 1]), "of one length"),
        (lambda: calibration_table([True], [0.5], n_bins=0), "at least 1 calibration bin"),
        (lambda: percentile_interval([0.5], confidence=1.5), "confidence level"),
        (lambda: mean_sd([0.5, 0.6], ddof=-1), "ddof >= 0"),
        (lambda: summarise_folds([]), "at least one fold"),
        (
            lambda: evaluate([0, 1], [0, 1], [0.2, 0.8], n_resamples=5).metric("f2"),
            "expected a metric of accuracy, sensitivity, .*got 'f2'",
        ),
    ],
)
def test_bad_arguments_are_sijnode_evaluation_errors(call: Any, message: str) -> None:
    """What the caller gave is wrong: an EvaluationError (a SijnodeError, so the command line
    prints one line; still a ValueError for callers that catch that) saying what was
    expected and what was found."""
    with pytest.raises(EvaluationError, match=message) as raised:
        call()
    assert isinstance(raised.value, SijnodeError) and isinstance(raised.value, ValueError)
