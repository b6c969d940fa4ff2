"""Commands of the audit part: ``sijnode audit ...``.

Heavy imports (SQLAlchemy, numpy, matplotlib) happen inside the commands so that
``sijnode --help`` stays fast. Every audit command checks that the schema is at the
head migration first and tells the user to run ``sijnode db upgrade`` if not. The filter
options of the listings are declared once, in :mod:`sijnode.audit.options`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sijnode.audit.filters import AuditFilter
from sijnode.audit.options import FormatOpt, LimitOpt, filter_options
from sijnode.audit.render import FileFormat as ExportFormat
from sijnode.audit.render import OutputFormat as Format
from sijnode.cli_context import audit_session

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sijnode.settings import SettingsLoader


class ExportWhat(enum.StrEnum):
    """What ``audit export`` writes."""

    studies = "studies"
    jobs = "jobs"
    predictions = "predictions"


class GroupByOption(enum.StrEnum):
    """Grouping of ``audit metrics`` (mirrors :class:`sijnode.audit.validation.GroupBy`)."""

    none = "none"
    site = "site"
    scanner = "scanner"
    model_version = "model_version"


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``sijnode audit`` to the ``sijnode`` app; ``settings`` loads this invocation's
    settings."""
    commands = AuditCommands(settings)
    audit_app = typer.Typer(
        help="Query the audit: studies, jobs, timelines, exports, summary, validation metrics.",
        no_args_is_help=True,
    )
    truth_app = typer.Typer(
        help="Reference labels (ground truth) for validation.", no_args_is_help=True
    )
    audit_app.add_typer(truth_app, name="truth")
    audit_app.command("studies")(commands.studies)
    audit_app.command("jobs")(commands.jobs)
    audit_app.command("timeline")(commands.timeline)
    audit_app.command("export")(commands.export)
    audit_app.command("summary")(commands.summary)
    audit_app.command("metrics")(commands.metrics)
    truth_app.command("import")(commands.truth_import)
    app.add_typer(audit_app, name="audit")


def _echo_rows(rows: list[dict[str, Any]], fmt: Format, columns: tuple[str, ...]) -> None:
    from sijnode.audit.render import render

    # The table shows the main columns; JSON and CSV carry every column.
    typer.echo(render(rows, fmt.value, columns if fmt is Format.table else None))


def _follow_rows(looks: Iterator[list[dict[str, Any]]], fmt: Format) -> None:
    """Print timeline entries as they come: aligned lines, JSON lines or CSV rows."""
    import json

    from sijnode.audit.queries import TIMELINE_COLUMNS
    from sijnode.audit.render import render

    first = True
    for new in looks:
        for entry in sorted(new, key=lambda e: e["at"]):
            if fmt is Format.json:
                typer.echo(json.dumps(entry, default=str))
            elif fmt is Format.csv:
                text = render([entry], "csv", TIMELINE_COLUMNS).rstrip("\n").splitlines()
                typer.echo("\n".join(text if first else text[1:]))
            else:
                job = "-" if entry["job_id"] is None else str(entry["job_id"])
                typer.echo(
                    f"{entry['at']:%H:%M:%S}  {entry['elapsed_s']:>8.3f} s  "
                    f"{entry['stage']:<16} {job:>4}  {entry['detail']}"
                )
            first = False


class AuditCommands:
    """The ``sijnode audit`` commands, on the settings that the root passes in."""

    def __init__(self, settings: SettingsLoader) -> None:
        self._settings = settings

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """A session on the configured audit database, after the schema check."""
        with audit_session(self._settings()) as session:
            yield session

    # ----------------------------------------------------------------------- listings

    @filter_options(state="study")
    def studies(self, flt: AuditFilter, limit: LimitOpt = 0, fmt: FormatOpt = Format.table) -> None:
        """List studies received in a date range, newest first."""
        from sijnode.audit.queries import STUDY_COLUMNS, list_studies

        with self._session() as session:
            rows = list_studies(session, flt, limit=limit or None)
        _echo_rows(rows, fmt, STUDY_COLUMNS)

    @filter_options(state="job")
    def jobs(self, flt: AuditFilter, limit: LimitOpt = 0, fmt: FormatOpt = Format.table) -> None:
        """List jobs created in a date range, newest first."""
        from sijnode.audit.queries import JOB_COLUMNS, list_jobs

        with self._session() as session:
            rows = list_jobs(session, flt, limit=limit or None)
        _echo_rows(rows, fmt, JOB_COLUMNS)

    def timeline(
        self,
        study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
        follow: Annotated[
            bool,
            typer.Option(
                "--follow", help="Print each stage as it happens, until --until is reached."
            ),
        ] = False,
        wait: Annotated[
            bool,
            typer.Option("--wait", help="Wait until --until is reached, then print the timeline."),
        ] = False,
        until: Annotated[
            str,
            typer.Option(
                help=(
                    "Stage that ends --follow/--wait: complete, dispatched, inferred, "
                    "reported, delivered, ... or done (left receiving, no job on its way)."
                )
            ),
        ] = "done",
        timeout: Annotated[
            float, typer.Option(min=0, help="Seconds to wait at most (--follow/--wait); exit 1.")
        ] = 300.0,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """One study's timeline: received, complete, dispatched, inferred, reported, delivered.

        Every event in between is listed too, with its time and seconds since receipt.
        Right after a send the study is ``receiving``; completion takes a few seconds (the
        content rule and its quiet time): ``--follow`` or ``--wait`` waits for it.
        """
        from sijnode.audit.queries import TIMELINE_COLUMNS, study_timeline

        if not (follow or wait):
            with self._session() as session:
                rows = study_timeline(session, study_uid)
            _echo_rows(rows, fmt, TIMELINE_COLUMNS)
            return
        from sijnode.audit.follow import follow as follow_timeline

        with self._sessions() as sessions:
            looks = follow_timeline(sessions, study_uid, until=until, timeout=timeout)
            if wait and not follow:
                rows = [entry for new in looks for entry in new]
                rows.sort(key=lambda e: e["at"])
                _echo_rows(rows, fmt, TIMELINE_COLUMNS)
                return
            _follow_rows(looks, fmt)

    @contextmanager
    def _sessions(self) -> Iterator[Any]:
        """A factory of short transactions on the audit (one per look), after the check."""
        from sijnode.db.engine import make_engine, make_sessionmaker, transaction
        from sijnode.db.migrate import check_schema_current

        settings = self._settings()
        engine = make_engine(settings.database.url, echo=settings.database.echo)
        try:
            check_schema_current(engine)
            maker = make_sessionmaker(engine)
            yield lambda: transaction(maker)
        finally:
            engine.dispose()

    @filter_options()
    def export(
        self,
        what: Annotated[ExportWhat, typer.Option("--what", help="studies, jobs or predictions.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="File to write; - for stdout.")],
        fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="csv or json.")] = (
            ExportFormat.csv
        ),
        *,
        flt: AuditFilter,
    ) -> None:
        """Write studies, jobs or predictions (with slice scores) to CSV or JSON."""
        from sijnode.audit.queries import list_jobs, list_predictions, list_studies
        from sijnode.audit.render import render_csv, render_json

        listing = {
            ExportWhat.studies: list_studies,
            ExportWhat.jobs: list_jobs,
            ExportWhat.predictions: list_predictions,
        }[what]
        with self._session() as session:
            rows = listing(session, flt)
        text = render_json(rows) + "\n" if fmt is ExportFormat.json else render_csv(rows)
        if str(out) == "-":
            typer.echo(text, nl=False)
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {len(rows)} {what.value} to {out}", err=True)

    @filter_options(delivery=False)
    def summary(self, flt: AuditFilter, fmt: FormatOpt = Format.table) -> None:
        """Volumes, p50/p95 latency of each stage, and failures in a date range."""
        from sijnode.audit.queries import summary
        from sijnode.audit.render import render_csv, render_json, render_table

        with self._session() as session:
            report = summary(session, flt)
        if fmt is Format.json:
            typer.echo(render_json(report))
            return
        if fmt is Format.csv:
            rows = [
                {"section": section, **row} for section, items in report.items() for row in items
            ]
            cols = ("section", "metric", "value", "stage", "n", "p50_s", "p95_s", "max_s")
            typer.echo(render_csv(rows, cols).rstrip("\n"))
            return
        typer.echo("Volumes")
        typer.echo(render_table(report["volumes"]))
        typer.echo("\nLatency per stage (seconds)")
        typer.echo(render_table(report["latency"]))
        typer.echo("\nFailures")
        typer.echo(render_table(report["failures"]))

    # ----------------------------------------------------------------------- metrics

    @filter_options(delivery=False)
    def metrics(
        self,
        flt: AuditFilter,
        group_by: Annotated[
            GroupByOption, typer.Option("--group-by", help="none, site, scanner or model_version.")
        ] = GroupByOption.none,
        reader: Annotated[
            str | None,
            typer.Option(help="Use this reader's labels (default: majority of readers)."),
        ] = None,
        resamples: Annotated[int, typer.Option(min=1, help="Bootstrap resamples.")] = 2000,
        seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
        confidence: Annotated[
            float, typer.Option(min=0.5, max=0.999, help="Confidence level of the intervals.")
        ] = 0.95,
        bins: Annotated[int, typer.Option(min=1, max=100, help="Calibration bins.")] = 10,
        roc_png: Annotated[
            Path | None, typer.Option("--roc-png", help="Write the ROC plot.")
        ] = None,
        calibration_png: Annotated[
            Path | None, typer.Option("--calibration-png", help="Write the calibration plot.")
        ] = None,
        fmt: FormatOpt = Format.table,
    ) -> None:
        """Validation metrics against imported ground truth, with bootstrap CIs.

        Accuracy, sensitivity, specificity, PPV, NPV, F1 and ROC AUC, the confusion matrix
        and a calibration table, per group.
        """
        from sijnode.audit.render import metrics_rows, metrics_table, render_csv, render_json
        from sijnode.audit.validation import GroupBy, compute_metrics

        with self._session() as session:
            result = compute_metrics(
                session,
                flt,
                group_by=GroupBy(group_by.value),
                reader=reader,
                n_resamples=resamples,
                seed=seed,
                confidence=confidence,
                n_bins=bins,
            )
        if fmt is Format.json:
            typer.echo(render_json(result.as_dict()))
        elif fmt is Format.csv:
            cols = (
                "group",
                "section",
                "name",
                "value",
                "ci_low",
                "ci_high",
                "count",
                "mean_predicted",
                "observed_fraction",
            )
            typer.echo(render_csv(metrics_rows(result), cols).rstrip("\n"))
        else:
            typer.echo(metrics_table(result))
        if roc_png is not None or calibration_png is not None:
            from sijnode.audit.validation import write_calibration_png, write_roc_png

            if roc_png is not None:
                write_roc_png(result, roc_png)
                typer.echo(f"wrote {roc_png}", err=True)
            if calibration_png is not None:
                write_calibration_png(result, calibration_png)
                typer.echo(f"wrote {calibration_png}", err=True)

    # ----------------------------------------------------------------------- truth

    def truth_import(
        self,
        file: Annotated[Path, typer.Argument(help="CSV file with the reference labels.")],
        replace: Annotated[
            bool,
            typer.Option(help="Replace labels already imported for the same study and reader."),
        ] = False,
    ) -> None:
        """Import reference labels from a CSV file: every row, or none if any row is bad."""
        from sijnode.audit.truth import import_truth

        secret = self._settings().database.pseudonym_secret
        with self._session() as session:
            result = import_truth(session, file, secret, replace=replace)
        readers = ", ".join(r or "(none)" for r in result.readers)
        typer.echo(
            f"imported {result.rows} label(s) ({result.positives} positive) from {file}; "
            f"readers: {readers}" + (f"; replaced {result.replaced}" if result.replaced else "")
        )
