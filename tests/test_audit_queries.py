"""Audit queries and their commands on a filled database (tests/test_db_data.py), on
SQLite and PostgreSQL: filters, timeline, export, summary; table, JSON and CSV output."""

from __future__ import annotations

import csv
import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import typer
import typer.main
from typer.testing import CliRunner

from sijnode.audit import cli as audit_cli
from sijnode.audit.filters import AuditFilter, parse_when
from sijnode.audit.queries import (
    StudyNotFoundError,
    list_jobs,
    list_predictions,
    list_studies,
    study_timeline,
    summary,
)
from sijnode.db.schema import DeliveryStatus
from sijnode.settings import load_settings
from tests.test_db_data import (
    T0,
    Audit,
    at,
    audit_fixture,  # noqa: F401 (fixture)
    scenario_fixture,  # noqa: F401 (fixture)
)


def _uids(rows: list[dict[str, object]]) -> list[object]:
    return [r["study_instance_uid"] for r in rows]


def test_parse_when() -> None:
    assert parse_when("2026-03-02") == T0.replace(hour=0)
    assert parse_when("2026-03-02", end=True) == T0.replace(hour=0, day=3)
    assert parse_when("2026-03-02T08:00") == T0
    assert parse_when("2026-03-02T10:00+02:00") == T0
    assert parse_when(None) is None
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_when("last tuesday")
    with pytest.raises(ValueError, match="--until after --since"):
        AuditFilter(since=at(10), until=at(0))


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (
            AuditFilter(),
            ["2.25.1006", "2.25.1005", "2.25.1004", "2.25.1003", "2.25.1002", "2.25.1001"],
        ),
        (
            AuditFilter(since=parse_when("2026-03-03"), until=parse_when("2026-03-03", end=True)),
            ["2.25.1002"],
        ),
        (AuditFilter(since=at(0, 3)), ["2.25.1006", "2.25.1005", "2.25.1004"]),
        (AuditFilter(pipeline="mr"), ["2.25.1002"]),
        (AuditFilter(model_version="v2"), ["2.25.1003"]),
        (AuditFilter(route="ct-pelvis"), ["2.25.1004", "2.25.1003", "2.25.1001"]),
        (AuditFilter(state="ignored"), ["2.25.1006"]),
        (AuditFilter(sender="MR_B"), ["2.25.1002"]),
        (AuditFilter(site="south"), ["2.25.1004", "2.25.1002"]),
        (AuditFilter(delivery=DeliveryStatus.DEAD), ["2.25.1003"]),
        (AuditFilter(delivery=DeliveryStatus.DELIVERED), ["2.25.1001"]),
        (AuditFilter(shadow=True), ["2.25.1004"]),
        (AuditFilter(pipeline="ct", shadow=False, site="north"), ["2.25.1003", "2.25.1001"]),
    ],
)
def test_list_studies_filters(scenario: Audit, flt: AuditFilter, expected: list[str]) -> None:
    with scenario.session() as s:
        assert _uids(list_studies(s, flt)) == expected


def test_study_row_shows_latest_active_job(scenario: Audit) -> None:
    with scenario.session() as s:
        rows = {r["study_instance_uid"]: r for r in list_studies(s)}
        assert list_studies(s, limit=2)[1]["study_instance_uid"] == "2.25.1005"
    row = rows["2.25.1003"]
    assert (row["jobs"], row["series"], row["instances"]) == (2, 1, 3)
    assert (row["job_state"], row["model_version"], row["probability"], row["label"]) == (
        "failed",
        "v2",
        0.8,
        True,
    )
    assert row["delivery"] == "pacs:dead"
    assert row["completed_at"] == at(200, 2)
    assert row["first_received_at"].tzinfo is not None
    assert rows["2.25.1005"]["job_state"] is None
    assert rows["2.25.1001"]["delivery"] == "pacs:delivered"


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (AuditFilter(), ["k4", "k3b", "k3a", "k2", "k1"]),
        (AuditFilter(state="superseded"), ["k3a"]),
        (AuditFilter(state="failed"), ["k3b", "k2"]),
        (AuditFilter(delivery=DeliveryStatus.DEAD), ["k3b"]),
        (AuditFilter(sender="MR_B"), ["k2"]),
        (AuditFilter(since=at(0, 2), until=at(0, 3)), ["k3b", "k3a"]),
        (AuditFilter(model_version="v1", pipeline="ct"), ["k4", "k3a", "k1"]),
        (AuditFilter(shadow=True), ["k4"]),
    ],
)
def test_list_jobs_filters(scenario: Audit, flt: AuditFilter, expected: list[str]) -> None:
    keys = {1: "k1", 2: "k2", 3: "k3a", 4: "k3b", 5: "k4"}
    with scenario.session() as s:
        assert [keys[r["job_id"]] for r in list_jobs(s, flt)] == expected


def test_job_rows(scenario: Audit) -> None:
    with scenario.session() as s:
        rows = {r["job_id"]: r for r in list_jobs(s)}
    assert rows[2]["error"] == "cannot decode pixel data"
    assert rows[2]["probability"] is None
    assert rows[3]["superseded_by"] == 4
    assert rows[1]["dispatched_at"] == at(51)
    assert rows[1]["finished_at"] == at(65)
    assert rows[4]["delivery"] == "pacs:dead"


def test_timeline_milestones(scenario: Audit) -> None:
    with scenario.session() as s:
        entries = study_timeline(s, "2.25.1001")
    first: dict[str, float] = {}
    for e in entries:
        first.setdefault(e["stage"], e["elapsed_s"])
    assert {k: first[k] for k in ("received", "complete", "dispatched")} == {
        "received": 0,
        "complete": 50,
        "dispatched": 51,
    }
    assert {k: first[k] for k in ("inferred", "reported", "delivered")} == {
        "inferred": 60,
        "reported": 62,
        "delivered": 65,
    }
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    assert any(e["stage"] == "delivery_attempt" and "pacs" in e["detail"] for e in entries)


def test_timeline_of_a_rerun_study(scenario: Audit) -> None:
    with scenario.session() as s:
        entries = study_timeline(s, "2.25.1003")
    stages = [(e["stage"], e["job_id"], e["elapsed_s"]) for e in entries]
    assert ("complete", None, 30) in stages and ("complete", None, 200) in stages
    assert ("reopened", None, 150) in stages
    assert ("superseded", 3, 200) in stages
    attempts = [e["detail"] for e in entries if e["stage"] == "delivery_attempt"]
    assert attempts == [
        "pacs attempt 1: retrying (connection refused)",
        "pacs attempt 2: dead (connection refused)",
    ]


def test_timeline_of_unknown_study(scenario: Audit) -> None:
    with scenario.session() as s, pytest.raises(StudyNotFoundError, match=r"2\.25\.404"):
        study_timeline(s, "2.25.404")


def test_summary(scenario: Audit) -> None:
    with scenario.session() as s:
        report = summary(s)
        mr = summary(s, AuditFilter(pipeline="mr"))
    volumes = {r["metric"]: r["value"] for r in report["volumes"]}
    assert volumes["studies"] == 6
    assert volumes["jobs"] == 5
    assert volumes["instances"] == 18
    assert volumes["associations"] == 3
    assert volumes["predictions.positive"] == 2
    assert volumes["deliveries.delivered"] == 1
    latency = {r["stage"]: r for r in report["latency"]}
    assert latency["receive→complete"]["n"] == 4
    assert latency["receive→complete"]["p50_s"] == pytest.approx(50.0)
    assert latency["receive→complete"]["p95_s"] == pytest.approx(
        np.percentile([40, 50, 50, 200], 95)
    )
    assert (latency["complete→dispatch"]["n"], latency["complete→dispatch"]["p50_s"]) == (5, 1.0)
    assert (latency["dispatch→inferred"]["n"], latency["dispatch→inferred"]["p95_s"]) == (4, 9.0)
    assert (latency["inferred→reported"]["n"], latency["inferred→reported"]["p50_s"]) == (2, 2.0)
    assert (latency["reported→delivered"]["n"], latency["reported→delivered"]["p50_s"]) == (1, 3.0)
    assert latency["receive→delivered"]["max_s"] == 65.0
    failures = {r["metric"]: r["value"] for r in report["failures"]}
    assert failures["jobs.failed"] == 2
    assert failures["deliveries.dead"] == 1
    assert failures["associations.rejected"] == 1
    assert failures["instances.refused"] == 1
    mr_volumes = {r["metric"]: r["value"] for r in mr["volumes"]}
    assert (mr_volumes["studies"], mr_volumes["jobs"]) == (1, 1)


def test_predictions_listing(scenario: Audit) -> None:
    with scenario.session() as s:
        rows = list_predictions(s)
    assert len(rows) == 4
    by_job = {r["job_id"]: r for r in rows}
    assert by_job[3]["active"] is False and by_job[4]["active"] is True
    assert [x["index"] for x in by_job[1]["slice_scores"]] == [0, 1, 2]
    assert by_job[1]["slice_scores"][2]["score"] == pytest.approx(0.91)


# --------------------------------------------------------------------------- commands


@pytest.fixture
def run(scenario: Audit, monkeypatch: pytest.MonkeyPatch):
    """Invoke ``sijnode`` commands of the db part against the scenario database."""
    monkeypatch.setenv("SIJNODE_DATABASE__URL", scenario.url)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    audit_cli.register(app, partial(load_settings, None))
    runner = CliRunner()

    def invoke(*args: str, code: int = 0):
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


def test_cli_studies_table_json_csv(run) -> None:
    table = run("audit", "studies").stdout
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["study_instance_uid", "site", "sender", "state"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 6
    assert "2.25.1003" in table and "pacs:dead" in table

    data = json.loads(run("audit", "studies", "--format", "json", "--sender", "MR_B").stdout)
    assert [r["study_instance_uid"] for r in data] == ["2.25.1002"]
    assert data[0]["first_received_at"] == "2026-03-03T08:00:00+00:00"
    assert "patient_pseudonym" in data[0]

    rows = list(csv.DictReader(io.StringIO(run("audit", "studies", "-f", "csv").stdout)))
    assert len(rows) == 6
    assert rows[0]["study_instance_uid"] == "2.25.1006"

    since = run("audit", "studies", "-f", "json", "--since", "2026-03-05", "--until", "2026-03-05")
    assert [r["study_instance_uid"] for r in json.loads(since.stdout)] == ["2.25.1004"]
    assert run("audit", "studies", "--state", "nonsense", code=2).exit_code == 2
    assert "ISO 8601" in run("audit", "studies", "--since", "yesterday", code=2).output


def test_cli_jobs_filters(run) -> None:
    data = json.loads(run("audit", "jobs", "-f", "json", "--delivery", "dead").stdout)
    assert [r["job_id"] for r in data] == [4]
    data = json.loads(run("audit", "jobs", "-f", "json", "--state", "failed").stdout)
    assert [r["job_id"] for r in data] == [4, 2]
    data = json.loads(
        run("audit", "jobs", "-f", "json", "--pipeline", "ct", "--model-version", "v1").stdout
    )
    assert [r["job_id"] for r in data] == [5, 3, 1]
    data = json.loads(run("audit", "jobs", "-f", "json", "--shadow").stdout)
    assert [r["job_id"] for r in data] == [5]
    assert "(no rows)" in run("audit", "jobs", "--sender", "NOBODY").stdout


def test_cli_timeline(run) -> None:
    table = run("audit", "timeline", "2.25.1001").stdout
    for stage in ("received", "complete", "dispatched", "inferred", "reported", "delivered"):
        assert stage in table
    data = json.loads(run("audit", "timeline", "2.25.1001", "-f", "json").stdout)
    assert data[0]["stage"] == "received" and data[0]["at"] == "2026-03-02T08:00:00+00:00"
    result = run("audit", "timeline", "2.25.404", code=1)
    assert isinstance(result.exception, StudyNotFoundError)


@pytest.mark.parametrize("what", ["studies", "jobs", "predictions"])
def test_cli_export(run, tmp_path: Path, what: str) -> None:
    expected = {"studies": 6, "jobs": 5, "predictions": 4}[what]
    out_json = tmp_path / f"{what}.json"
    out_csv = tmp_path / "sub" / f"{what}.csv"
    run("audit", "export", "--what", what, "--format", "json", "--out", str(out_json))
    run("audit", "export", "--what", what, "--format", "csv", "--out", str(out_csv))
    data = json.loads(out_json.read_text())
    rows = list(csv.DictReader(out_csv.open()))
    assert len(data) == len(rows) == expected
    assert list(rows[0]) == list(data[0])
    if what == "predictions":
        assert len(data[0]["slice_scores"]) == 3
        assert len(json.loads(rows[0]["slice_scores"])) == 3
    filtered = tmp_path / "mr.json"
    run("audit", "export", "--what", what, "-f", "json", "-o", str(filtered), "--pipeline", "mr")
    assert (
        len(json.loads(filtered.read_text())) == {"studies": 1, "jobs": 1, "predictions": 0}[what]
    )


def test_cli_summary(run) -> None:
    table = run("audit", "summary").stdout
    assert "Volumes" in table and "Latency per stage" in table and "Failures" in table
    assert "complete→dispatch" in table
    data = json.loads(run("audit", "summary", "-f", "json").stdout)
    assert set(data) == {"volumes", "latency", "failures"}
    rows = list(csv.DictReader(io.StringIO(run("audit", "summary", "-f", "csv").stdout)))
    latency = {r["stage"]: r for r in rows if r["section"] == "latency"}
    assert float(latency["dispatch→inferred"]["p50_s"]) == 9.0
    data = json.loads(run("audit", "summary", "-f", "json", "--sender", "MR_B").stdout)
    volumes = {r["metric"]: r["value"] for r in data["volumes"]}
    assert (volumes["studies"], volumes["associations"]) == (1, 1)


def test_listings_share_one_declaration_of_the_filters() -> None:
    """Every listing takes the filters of audit/options.py, declared once, in one order."""
    from sijnode.audit.options import FILTER_OPTIONS, filter_options

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    audit_cli.register(app, partial(load_settings, None))
    audit = typer.main.get_command(app).commands["audit"]  # type: ignore[attr-defined]
    common = [n for n in FILTER_OPTIONS if n not in ("state", "delivery")]
    expected = {
        "studies": ["state", "delivery"],
        "jobs": ["state", "delivery"],
        "export": ["delivery"],
        "summary": [],
        "metrics": [],
    }
    seen: dict[str, tuple[object, ...]] = {}
    for name, extra in expected.items():
        params = {p.name: p for p in audit.commands[name].params}
        filters = [n for n in FILTER_OPTIONS if n in params]
        assert filters == [n for n in FILTER_OPTIONS if n in common or n in extra], name
        for option in filters:
            p = params[option]
            if option != "state":
                described = (tuple(p.opts), tuple(p.secondary_opts), p.help, p.default)
                assert seen.setdefault(option, described) == described, (name, option)
    assert "Study state" in params_help(audit.commands["studies"], "state")
    assert "Job state" in params_help(audit.commands["jobs"], "state")

    def no_filter(self: object) -> None:
        """No ``flt`` parameter."""

    with pytest.raises(TypeError, match="expected a parameter 'flt'"):
        filter_options()(no_filter)


def params_help(command: object, name: str) -> str:
    return next(p.help for p in command.params if p.name == name)  # type: ignore[attr-defined]


def test_cli_filter_errors(run) -> None:
    bad_state = run("audit", "jobs", "--state", "complete", code=2)
    assert "expected a job state (queued" in bad_state.output
    bad_date = run("audit", "summary", "--since", "yesterday", code=2)
    assert "expected an ISO 8601 date" in bad_date.output
    reversed_window = run(
        "audit",
        "export",
        "--what",
        "jobs",
        "--out",
        "-",
        "--since",
        "2026-03-05",
        "--until",
        "2026-03-01",
        code=2,
    )
    assert "expected --until after --since" in reversed_window.output
