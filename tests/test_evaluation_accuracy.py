"""Validation metrics: the numpy implementation against scikit-learn on random data with
ties, the bootstrap, and ``audit metrics`` on SQLite and PostgreSQL with plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import typer
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from typer.testing import CliRunner

from sijnode.audit import cli as audit_cli
from sijnode.audit.queries import AuditFilter
from sijnode.audit.validation import GroupBy, compute_metrics, validation_cases
from sijnode.db.records import record_prediction
from sijnode.db.schema import GroundTruth, Job
from sijnode.evaluation.accuracy import (
    METRIC_NAMES,
    binary_metrics,
    bootstrap_metrics,
    calibration_table,
    confusion,
    evaluate,
    percentile_interval,
    roc_auc,
    roc_curve,
)
from tests.test_db_data import (
    Audit,
    add_job,
    add_study,
    at,
    audit_fixture,  # noqa: F401 (fixture)
    fill_scenario,
    fill_validation,
)


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


# --------------------------------------------------------------------------- from the audit


def test_audit_metrics_match_sklearn(audit: Audit) -> None:
    data = fill_validation(audit, 90, seed=7)
    with audit.session() as s:
        result = compute_metrics(s, n_resamples=300, seed=1)
        by_site = compute_metrics(s, group_by=GroupBy.site, n_resamples=100)
        by_version = compute_metrics(s, group_by=GroupBy.model_version, n_resamples=100)
        by_scanner = compute_metrics(s, group_by=GroupBy.scanner, n_resamples=100)
        v2 = compute_metrics(s, AuditFilter(model_version="v2"), n_resamples=100)
        late = compute_metrics(s, AuditFilter(since=at(60 * 45)), n_resamples=100)
    (report,) = result.reports
    theirs = _sklearn(data["truth"], data["pred"], data["prob"])
    for name in METRIC_NAMES:
        assert report.metric(name).estimate == pytest.approx(theirs[name]), name
    assert (report.n, report.positives) == (90, int(data["truth"].sum()))
    assert [r.group for r in by_site.reports] == ["north", "south"]
    assert [r.n for r in by_site.reports] == [45, 45]
    assert [r.group for r in by_version.reports] == ["v1", "v2"]
    assert [r.n for r in by_version.reports] == [60, 30]
    assert [r.group for r in by_scanner.reports] == ["ACME Scan 1", "Other Scan 1"]
    mask = data["version"] == "v2"
    assert v2.reports[0].metric("roc_auc").estimate == pytest.approx(
        skm.roc_auc_score(data["truth"][mask], data["prob"][mask])
    )
    assert late.reports[0].n == 45
    assert result.excluded == {}


def test_latest_unsuperseded_result_and_exclusions(audit: Audit) -> None:
    fill_scenario(audit)
    with audit.session() as s:
        for uid, label, reader in [
            ("2.25.1001", True, "r1"),
            ("2.25.1003", True, "r1"),
            ("2.25.1004", False, "r1"),
            ("2.25.1004", True, "r2"),  # readers tie on 1004
            ("2.25.1002", True, "r1"),  # failed job: no result
        ]:
            s.add(GroundTruth(study_instance_uid=uid, label=label, reader_id=reader))
        study = add_study(s, "2.25.1010", received=at(0, 5))  # result but no truth
        job = add_job(s, study, "k10", created=at(50, 5))
        record_prediction(s, job, 0.3, False, 0.5)
    with audit.session() as s:
        cases, excluded = validation_cases(s)
        cases_r1, excluded_r1 = validation_cases(s, reader="r1")
        live, _ = validation_cases(s, AuditFilter(shadow=False), reader="r1")
        jobs = {j.id: j.job_key for j in s.query(Job)}
    assert {c.study_instance_uid: (c.probability, jobs[c.job_id]) for c in cases} == {
        "2.25.1001": (0.91, "k1"),
        "2.25.1003": (0.8, "k3b"),  # not the superseded job's 0.2
    }
    assert excluded == {"readers_tied": 1, "no_truth": 1, "truth_without_result": 1}
    assert {c.study_instance_uid for c in cases_r1} == {"2.25.1001", "2.25.1003", "2.25.1004"}
    assert excluded_r1 == {"no_truth": 1, "truth_without_result": 1}
    assert {c.study_instance_uid for c in live} == {"2.25.1001", "2.25.1003"}


def test_cli_metrics(audit: Audit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fill_validation(audit, 60, seed=3)
    monkeypatch.setenv("SIJNODE_DATABASE__URL", audit.url)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    audit_cli.register(app)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["audit", "metrics", "--resamples", "200", *args])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.stdout

    table = run()
    for word in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
        assert word in table
    assert "95% CI" in table and "predicted positive" in table and "Calibration" in table

    data_json = json.loads(run("--format", "json", "--group-by", "site"))
    assert data_json["group_by"] == "site"
    assert [g["group"] for g in data_json["groups"]] == ["north", "south"]
    north = data_json["groups"][0]
    assert north["n"] == 30 and len(north["calibration"]) == 10
    auc = north["metrics"]["roc_auc"]
    assert auc["ci_low"] <= auc["estimate"] <= auc["ci_high"]
    mask = data["site"] == "north"
    assert auc["estimate"] == pytest.approx(
        skm.roc_auc_score(data["truth"][mask], data["prob"][mask])
    )

    csv_text = run("--format", "csv", "--bins", "5", "--seed", "4")
    header, *lines = csv_text.splitlines()
    assert header.startswith("group,section,name,value,ci_low,ci_high")
    assert sum(1 for line in lines if ",calibration," in line) == 5
    assert sum(1 for line in lines if ",metric," in line) == 7

    roc, cal = tmp_path / "roc.png", tmp_path / "plots" / "cal.png"
    run("--roc-png", str(roc), "--calibration-png", str(cal), "--group-by", "model_version")
    for path in (roc, cal):
        assert path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    empty = run("--model-version", "nope")
    assert "no studies with both a result and a reference label" in empty
