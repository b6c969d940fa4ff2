"""Ground-truth import: good files by UID and by accession; bad files report every bad
line and import nothing (one transaction), on SQLite and PostgreSQL."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

from sijnode.audit import cli as audit_cli
from sijnode.audit.truth import TruthFileError, import_truth, parse_label, parse_slice_labels
from sijnode.db.schema import Event, EventType, GroundTruth
from sijnode.errors import TruthImportError
from sijnode.settings import load_settings
from tests.test_db_data import (
    SECRET,
    Audit,
    audit_fixture,  # noqa: F401 (fixture)
    scenario_fixture,  # noqa: F401 (fixture)
)


def _write(tmp_path: Path, text: str, name: str = "truth.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _count(audit: Audit) -> tuple[int, int]:
    with audit.session() as s:
        rows = s.scalar(select(func.count(GroundTruth.id)))
        events = s.scalar(
            select(func.count(Event.id)).where(Event.type == EventType.TRUTH_IMPORTED)
        )
    return int(rows or 0), int(events or 0)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("0", False), ("TRUE", True), ("false", False), (" Positive ", True)],
)
def test_parse_label(text: str, value: bool) -> None:
    assert parse_label(text) is value
    assert parse_label("negative") is False


def test_parse_label_and_slices_errors() -> None:
    with pytest.raises(ValueError, match="got 'maybe'"):
        parse_label("maybe")
    assert parse_slice_labels("0011 1") == [0, 0, 1, 1, 1]
    assert parse_slice_labels("0,1,0") == [0, 1, 0]
    assert parse_slice_labels("  ") is None
    with pytest.raises(ValueError, match="only 0 and 1"):
        parse_slice_labels("0012")


def test_import_by_uid_and_accession(scenario: Audit, tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "\ufeffStudy_Instance_UID,accession,label,slice_labels,reader_id,notes\n"
        "2.25.1001,,positive,011,r1,extra columns are ignored\n"
        ",ACC1003,1,,r1,\n"
        "2.25.1004,,false,000,r1,\n"
        "\n"
        "2.25.1001,ACC1001,true,,r2,both columns agree\n",
    )
    with scenario.session() as s:
        result = import_truth(s, path, SECRET)
    assert (result.rows, result.positives, result.replaced) == (4, 3, 0)
    assert result.readers == ["r1", "r2"]
    with scenario.session() as s:
        rows = {
            (g.study_instance_uid, g.reader_id): g
            for g in s.scalars(select(GroundTruth).order_by(GroundTruth.id))
        }
        event = s.scalars(select(Event).where(Event.type == EventType.TRUTH_IMPORTED)).one()
    assert set(rows) == {
        ("2.25.1001", "r1"),
        ("2.25.1003", "r1"),
        ("2.25.1004", "r1"),
        ("2.25.1001", "r2"),
    }
    assert rows[("2.25.1001", "r1")].slice_labels == [0, 1, 1]
    assert rows[("2.25.1003", "r1")].label is True
    assert rows[("2.25.1003", "r1")].slice_labels is None
    assert rows[("2.25.1004", "r1")].label is False
    assert rows[("2.25.1001", "r1")].source_file == "truth.csv"
    assert event.detail["rows"] == 4 and event.detail["file"] == "truth.csv"
    assert "ACC1003" not in repr(event.detail)  # raw accession numbers are never stored


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        pytest.param(
            "study_instance_uid,label\n"
            "2.25.1001,1\n"
            "2.25.9999,0\n"
            "2.25.1003,maybe\n"
            "2.25.1001,0\n"
            "2.25.1004,\n",
            [
                (3, "unknown study: no study with StudyInstanceUID '2.25.9999'"),
                (4, "label: expected 0/1, true/false or positive/negative, got 'maybe'"),
                (5, "duplicate: study 2.25.1001 with no reader_id is already on line 2"),
                (6, "label: expected 0/1, true/false or positive/negative, got ''"),
            ],
            id="unknown-bad-label-duplicate",
        ),
        pytest.param(
            "accession,label,slice_labels\nACC1001,1,01x\nNOPE,0,\n",
            [
                (2, "slice_labels: expected only 0 and 1"),
                (3, "unknown study: no study with this accession number"),
            ],
            id="accession-and-slices",
        ),
        pytest.param(
            "study_instance_uid,accession,label\n2.25.1001,ACC1003,1\n,,1\n",
            [
                (2, "accession number belongs to study 2.25.1003, not to 2.25.1001"),
                (3, "expected study_instance_uid or accession, got neither"),
            ],
            id="uid-accession-mismatch",
        ),
        pytest.param(
            "study_instance_uid,diagnosis\n2.25.1001,1\n",
            [(1, "missing column(s) label; header has study_instance_uid, diagnosis")],
            id="missing-label-column",
        ),
        pytest.param(
            "patient,label\nX,1\n",
            [(1, "missing column(s) study_instance_uid or accession")],
            id="missing-study-column",
        ),
        pytest.param("study_instance_uid,label\n", [(1, "no data rows")], id="no-rows"),
        pytest.param(
            'study_instance_uid,label\n"2.25.1001",1\n2.25.1003,1,surplus\n',
            [(3, "too many cells (3 cells, header has 2)")],
            id="too-many-cells",
        ),
    ],
)
def test_bad_files_import_nothing(
    scenario: Audit, tmp_path: Path, text: str, problems: list[tuple[int, str]]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TruthFileError) as info, scenario.session() as s:
        import_truth(s, path, SECRET)
    found = [(p.line, p.message) for p in info.value.problems]
    assert [line for line, _ in found] == [line for line, _ in problems]
    for (_, message), (_, expected) in zip(found, problems, strict=True):
        assert message.startswith(expected), (message, expected)
    assert "nothing imported" in str(info.value)
    assert f"line {problems[0][0]}:" in str(info.value)
    assert _count(scenario) == (0, 0)


def test_already_imported_needs_replace(scenario: Audit, tmp_path: Path) -> None:
    first = _write(tmp_path, "study_instance_uid,label\n2.25.1001,1\n2.25.1003,1\n", "a.csv")
    second = _write(tmp_path, "study_instance_uid,label\n2.25.1004,0\n2.25.1001,0\n", "b.csv")
    with scenario.session() as s:
        import_truth(s, first, SECRET)
    with pytest.raises(TruthFileError) as info, scenario.session() as s:
        import_truth(s, second, SECRET)
    assert [(p.line, "--replace" in p.message) for p in info.value.problems] == [(3, True)]
    assert _count(scenario) == (2, 1)
    with scenario.session() as s:
        result = import_truth(s, second, SECRET, replace=True)
    assert result.replaced == 1
    with scenario.session() as s:
        labels = dict(s.execute(select(GroundTruth.study_instance_uid, GroundTruth.label)).all())
    assert labels == {"2.25.1001": False, "2.25.1003": True, "2.25.1004": False}


def test_wrong_secret_finds_no_accession(scenario: Audit, tmp_path: Path) -> None:
    path = _write(tmp_path, "accession,label\nACC1001,1\n")
    with pytest.raises(TruthFileError, match="unknown study"), scenario.session() as s:
        import_truth(s, path, "another-site-secret")


def test_missing_file(audit: Audit, tmp_path: Path) -> None:
    with pytest.raises(TruthImportError, match="does not exist"), audit.session() as s:
        import_truth(s, tmp_path / "nope.csv", SECRET)


def test_cli_truth_import(scenario: Audit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIJNODE_DATABASE__URL", scenario.url)
    monkeypatch.setenv("SIJNODE_DATABASE__PSEUDONYM_SECRET", SECRET)
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    audit_cli.register(app, partial(load_settings, None))
    runner = CliRunner()
    good = _write(tmp_path, "accession,label,reader_id\nACC1001,1,r1\nACC1003,0,r1\n")
    result = runner.invoke(app, ["audit", "truth", "import", str(good)])
    assert result.exit_code == 0, result.output
    assert "imported 2 label(s) (1 positive)" in result.stdout
    bad = _write(tmp_path, "accession,label\nACC1001,yes\nACC0000,1\n", "bad.csv")
    result = runner.invoke(app, ["audit", "truth", "import", str(bad)])
    assert result.exit_code == 1
    assert isinstance(result.exception, TruthFileError)
    assert "line 3: unknown study" in str(result.exception)
    assert _count(scenario) == (2, 1)
