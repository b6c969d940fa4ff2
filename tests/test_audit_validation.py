"""``audit metrics``: each study's latest result paired with its reference label, metrics
per group against scikit-learn, exclusions, and the command with plots, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import typer
from sklearn import metrics as skm
from typer.testing import CliRunner

from sijnode.audit import cli as audit_cli
from sijnode.audit.filters import AuditFilter
from sijnode.audit.validation import GroupBy, compute_metrics, validation_cases
from sijnode.db.records import record_prediction
from sijnode.db.schema import GroundTruth, Job
from sijnode.evaluation.accuracy import METRIC_NAMES
from sijnode.settings import load_settings
from tests.test_db_data import (
    Audit,
    add_job,
    add_study,
    at,
    audit_fixture,  # noqa: F401 (fixture)
    fill_scenario,
    fill_validation,
)
from tests.test_evaluation_accuracy import _sklearn


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

    audit_cli.register(app, partial(load_settings, None))
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
