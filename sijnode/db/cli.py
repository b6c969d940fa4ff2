"""Commands of the db part: ``sijnode db ...`` (migrations) and ``sijnode audit ...``.

Heavy imports (SQLAlchemy, numpy, matplotlib) happen inside the commands so that
``sijnode --help`` stays fast. Every audit command checks that the schema is at the
head migration first and tells the user to run ``sijnode db upgrade`` if not.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sijnode.cli import state
from sijnode.db.render import FileFormat as ExportFormat
from sijnode.db.render import OutputFormat as Format

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from sijnode.db.queries import AuditFilter
    from sijnode.db.validation import ValidationResult
    from sijnode.settings import Settings


class ExportWhat(enum.StrEnum):
    """What ``audit export`` writes."""

    studies = "studies"
    jobs = "jobs"
    predictions = "predictions"


class Delivery(enum.StrEnum):
    """Delivery states (mirrors :class:`sijnode.db.schema.DeliveryStatus`)."""

    pending = "pending"
    retrying = "retrying"
    committing = "committing"
    delivered = "delivered"
    dead = "dead"
    shadow = "shadow"


class GroupByOption(enum.StrEnum):
    """Grouping of ``audit metrics`` (mirrors :class:`sijnode.db.validation.GroupBy`)."""

    none = "none"
    site = "site"
    scanner = "scanner"
    model_version = "model_version"


db_app = typer.Typer(help="The audit database: schema migrations.", no_args_is_help=True)
audit_app = typer.Typer(
    help="Query the audit: studies, jobs, timelines, exports, summary, validation metrics.",
    no_args_is_help=True,
)
truth_app = typer.Typer(
    help="Reference labels (ground truth) for validation.", no_args_is_help=True
)
audit_app.add_typer(truth_app, name="truth")

FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="table, json or csv.")]
SinceOpt = Annotated[
    str | None,
    typer.Option(help="From this UTC date or date-time (ISO 8601), inclusive."),
]
UntilOpt = Annotated[
    str | None,
    typer.Option(help="Up to this UTC date (whole day included) or date-time (exclusive)."),
]
PipelineOpt = Annotated[str | None, typer.Option(help="Pipeline (ct, mr).")]
ModelOpt = Annotated[str | None, typer.Option("--model-version", help="Model version.")]
RouteOpt = Annotated[str | None, typer.Option(help="Route name.")]
SenderOpt = Annotated[str | None, typer.Option(help="Calling AE title of the sender.")]
SiteOpt = Annotated[str | None, typer.Option(help="Site name.")]
DeliveryOpt = Annotated[
    Delivery | None, typer.Option("--delivery", help="Jobs with a delivery in this state.")
]
ShadowOpt = Annotated[
    bool | None, typer.Option("--shadow/--no-shadow", help="Only shadow-mode or only live jobs.")
]
LimitOpt = Annotated[int, typer.Option(min=0, help="At most this many rows; 0 = all.")]


def _settings(ctx: typer.Context) -> Settings:
    return state(ctx).settings()


@contextmanager
def _session(ctx: typer.Context) -> Iterator[Session]:
    """A session on the configured audit database, after the schema check."""
    from sijnode.db.engine import make_engine, make_sessionmaker, transaction
    from sijnode.db.migrate import check_schema_current

    settings = _settings(ctx)
    engine = make_engine(settings.database.url, echo=settings.database.echo)
    try:
        check_schema_current(engine)
        with transaction(make_sessionmaker(engine)) as session:
            yield session
    finally:
        engine.dispose()


def _filter(**kwargs: Any) -> AuditFilter:
    from sijnode.db.queries import AuditFilter, parse_when
    from sijnode.db.schema import DeliveryStatus

    try:
        since = parse_when(kwargs.pop("since"))
        until = parse_when(kwargs.pop("until"), end=True)
        delivery = kwargs.pop("delivery", None)
        return AuditFilter(
            since=since,
            until=until,
            delivery=None if delivery is None else DeliveryStatus(delivery.value),
            **kwargs,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _check_state(value: str | None, allowed: type[enum.Enum], what: str) -> str | None:
    if value is None:
        return None
    values = [str(m.value) for m in allowed]
    if value not in values:
        raise typer.BadParameter(
            f"expected a {what} state ({', '.join(values)}), got {value!r}", param_hint="--state"
        )
    return value


def _echo_rows(rows: list[dict[str, Any]], fmt: Format, columns: tuple[str, ...]) -> None:
    from sijnode.db.render import render

    # The table shows the main columns; JSON and CSV carry every column.
    typer.echo(render(rows, fmt.value, columns if fmt is Format.table else None))


# --------------------------------------------------------------------------- sijnode db


@db_app.command("upgrade")
def db_upgrade(
    ctx: typer.Context,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the SQL instead of running it (for review).")
    ] = False,
) -> None:
    """Create or migrate the audit database schema to the newest revision."""
    from sqlalchemy.engine import make_url

    from sijnode.db.engine import make_engine
    from sijnode.db.migrate import current_revision, upgrade, upgrade_sql

    url = _settings(ctx).database.url
    shown = make_url(url).render_as_string(hide_password=True)
    if sql:
        typer.echo(upgrade_sql(url, revision))
        return
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        after = upgrade(engine, revision)
    finally:
        engine.dispose()
    if before == after:
        typer.echo(f"{shown}: already at revision {after}")
    else:
        typer.echo(f"{shown}: upgraded from {before or 'empty'} to {after}")


@db_app.command("current")
def db_current(
    ctx: typer.Context,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if the schema is not at the newest revision.")
    ] = False,
) -> None:
    """Show the schema revision of the audit database and the newest one."""
    from sqlalchemy.engine import make_url

    from sijnode.db.engine import make_engine
    from sijnode.db.migrate import schema_status

    url = _settings(ctx).database.url
    engine = make_engine(url)
    try:
        status = schema_status(engine)
    finally:
        engine.dispose()
    shown = make_url(url).render_as_string(hide_password=True)
    verdict = "up to date" if status.up_to_date else "out of date: run `sijnode db upgrade`"
    typer.echo(
        f"{shown}: revision {status.current or 'none (empty)'}, head {status.head}, {verdict}"
    )
    if check and not status.up_to_date:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- listings


@audit_app.command("studies")
def audit_studies(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    pipeline: PipelineOpt = None,
    model_version: ModelOpt = None,
    route: RouteOpt = None,
    state_: Annotated[
        str | None, typer.Option("--state", help="Study state: receiving, complete, ...")
    ] = None,
    sender: SenderOpt = None,
    site: SiteOpt = None,
    delivery: DeliveryOpt = None,
    shadow: ShadowOpt = None,
    limit: LimitOpt = 0,
    fmt: FormatOpt = Format.table,
) -> None:
    """List studies received in a date range, newest first."""
    from sijnode.db.queries import STUDY_COLUMNS, list_studies
    from sijnode.db.schema import StudyState

    flt = _filter(
        since=since,
        until=until,
        pipeline=pipeline,
        model_version=model_version,
        route=route,
        state=_check_state(state_, StudyState, "study"),
        sender=sender,
        site=site,
        delivery=delivery,
        shadow=shadow,
    )
    with _session(ctx) as session:
        rows = list_studies(session, flt, limit=limit or None)
    _echo_rows(rows, fmt, STUDY_COLUMNS)


@audit_app.command("jobs")
def audit_jobs(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    pipeline: PipelineOpt = None,
    model_version: ModelOpt = None,
    route: RouteOpt = None,
    state_: Annotated[
        str | None,
        typer.Option("--state", help="Job state: queued, running, inferred, failed, ..."),
    ] = None,
    sender: SenderOpt = None,
    site: SiteOpt = None,
    delivery: DeliveryOpt = None,
    shadow: ShadowOpt = None,
    limit: LimitOpt = 0,
    fmt: FormatOpt = Format.table,
) -> None:
    """List jobs created in a date range, newest first."""
    from sijnode.db.queries import JOB_COLUMNS, list_jobs
    from sijnode.db.schema import JobState

    flt = _filter(
        since=since,
        until=until,
        pipeline=pipeline,
        model_version=model_version,
        route=route,
        state=_check_state(state_, JobState, "job"),
        sender=sender,
        site=site,
        delivery=delivery,
        shadow=shadow,
    )
    with _session(ctx) as session:
        rows = list_jobs(session, flt, limit=limit or None)
    _echo_rows(rows, fmt, JOB_COLUMNS)


@audit_app.command("timeline")
def audit_timeline(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    fmt: FormatOpt = Format.table,
) -> None:
    """One study's timeline: received, complete, dispatched, inferred, reported, delivered.

    Every event in between is listed too, with its time and seconds since receipt.
    """
    from sijnode.db.queries import TIMELINE_COLUMNS, study_timeline

    with _session(ctx) as session:
        rows = study_timeline(session, study_uid)
    _echo_rows(rows, fmt, TIMELINE_COLUMNS)


@audit_app.command("export")
def audit_export(
    ctx: typer.Context,
    what: Annotated[ExportWhat, typer.Option("--what", help="studies, jobs or predictions.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write; - for stdout.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="csv or json.")] = (
        ExportFormat.csv
    ),
    since: SinceOpt = None,
    until: UntilOpt = None,
    pipeline: PipelineOpt = None,
    model_version: ModelOpt = None,
    route: RouteOpt = None,
    sender: SenderOpt = None,
    site: SiteOpt = None,
    delivery: DeliveryOpt = None,
    shadow: ShadowOpt = None,
) -> None:
    """Write studies, jobs or predictions (with slice scores) to CSV or JSON."""
    from sijnode.db.queries import list_jobs, list_predictions, list_studies
    from sijnode.db.render import render_csv, render_json

    flt = _filter(
        since=since,
        until=until,
        pipeline=pipeline,
        model_version=model_version,
        route=route,
        sender=sender,
        site=site,
        delivery=delivery,
        shadow=shadow,
    )
    listing = {
        ExportWhat.studies: list_studies,
        ExportWhat.jobs: list_jobs,
        ExportWhat.predictions: list_predictions,
    }[what]
    with _session(ctx) as session:
        rows = listing(session, flt)
    text = render_json(rows) + "\n" if fmt is ExportFormat.json else render_csv(rows)
    if str(out) == "-":
        typer.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {len(rows)} {what.value} to {out}", err=True)


@audit_app.command("summary")
def audit_summary(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    pipeline: PipelineOpt = None,
    model_version: ModelOpt = None,
    route: RouteOpt = None,
    sender: SenderOpt = None,
    site: SiteOpt = None,
    shadow: ShadowOpt = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Volumes, p50/p95 latency of each stage, and failures in a date range."""
    from sijnode.db.queries import summary
    from sijnode.db.render import render_csv, render_json, render_table

    flt = _filter(
        since=since,
        until=until,
        pipeline=pipeline,
        model_version=model_version,
        route=route,
        sender=sender,
        site=site,
        shadow=shadow,
    )
    with _session(ctx) as session:
        report = summary(session, flt)
    if fmt is Format.json:
        typer.echo(render_json(report))
        return
    if fmt is Format.csv:
        rows = [{"section": section, **row} for section, items in report.items() for row in items]
        cols = ("section", "metric", "value", "stage", "n", "p50_s", "p95_s", "max_s")
        typer.echo(render_csv(rows, cols).rstrip("\n"))
        return
    typer.echo("Volumes")
    typer.echo(render_table(report["volumes"]))
    typer.echo("\nLatency per stage (seconds)")
    typer.echo(render_table(report["latency"]))
    typer.echo("\nFailures")
    typer.echo(render_table(report["failures"]))


# --------------------------------------------------------------------------- metrics


def _metrics_rows(result: ValidationResult) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for r in result.reports:
        for name, value in (
            ("n", r.n),
            ("positives", r.positives),
            ("negatives", r.negatives),
            ("tp", r.confusion.tp),
            ("fp", r.confusion.fp),
            ("tn", r.confusion.tn),
            ("fn", r.confusion.fn),
            ("brier", r.brier),
        ):
            rows.append({"group": r.group, "section": "count", "name": name, "value": value})
        for m in r.metrics:
            rows.append(
                {
                    "group": r.group,
                    "section": "metric",
                    "name": m.name,
                    "value": m.estimate,
                    "ci_low": m.ci_low,
                    "ci_high": m.ci_high,
                }
            )
        for b in r.calibration:
            rows.append(
                {
                    "group": r.group,
                    "section": "calibration",
                    "name": f"{b.lower:.2f}-{b.upper:.2f}",
                    "count": b.count,
                    "mean_predicted": b.mean_predicted,
                    "observed_fraction": b.observed_fraction,
                }
            )
    return rows


def _echo_metrics_table(result: ValidationResult) -> None:
    from sijnode.db.render import render_table, text_value

    excluded = ", ".join(f"{k} {v}" for k, v in sorted(result.excluded.items()))
    if not result.reports:
        typer.echo("no studies with both a result and a reference label match the filters")
    for r in result.reports:
        pct = f"{round(100 * r.confidence)}%"
        typer.echo(
            f"group {r.group}: n={r.n} (truth positive {r.positives}, negative {r.negatives}); "
            f"{pct} CI: percentile bootstrap, {r.n_resamples} resamples, seed {r.seed}"
        )
        typer.echo(
            render_table(
                [
                    {
                        "metric": m.name,
                        "estimate": m.estimate,
                        f"{pct} CI": (
                            ""
                            if m.ci_low != m.ci_low
                            else f"{text_value(m.ci_low)} – {text_value(m.ci_high)}"
                        ),
                    }
                    for m in r.metrics
                ]
            )
        )
        c = r.confusion
        typer.echo("")
        typer.echo(
            render_table(
                [
                    {"": "predicted positive", "truth positive": c.tp, "truth negative": c.fp},
                    {"": "predicted negative", "truth positive": c.fn, "truth negative": c.tn},
                ]
            )
        )
        typer.echo(f"\nCalibration (Brier score {text_value(r.brier)})")
        typer.echo(
            render_table(
                [
                    {
                        "bin": f"{b.lower:.1f}–{b.upper:.1f}",
                        "count": b.count,
                        "mean_predicted": b.mean_predicted,
                        "observed_fraction": b.observed_fraction,
                    }
                    for b in r.calibration
                ]
            )
        )
        typer.echo("")
    if excluded:
        typer.echo(f"left out: {excluded}")


@audit_app.command("metrics")
def audit_metrics(
    ctx: typer.Context,
    since: SinceOpt = None,
    until: UntilOpt = None,
    pipeline: PipelineOpt = None,
    model_version: ModelOpt = None,
    route: RouteOpt = None,
    sender: SenderOpt = None,
    site: SiteOpt = None,
    shadow: ShadowOpt = None,
    group_by: Annotated[
        GroupByOption, typer.Option("--group-by", help="none, site, scanner or model_version.")
    ] = GroupByOption.none,
    reader: Annotated[
        str | None, typer.Option(help="Use this reader's labels (default: majority of readers).")
    ] = None,
    resamples: Annotated[int, typer.Option(min=1, help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    confidence: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Confidence level of the intervals.")
    ] = 0.95,
    bins: Annotated[int, typer.Option(min=1, max=100, help="Calibration bins.")] = 10,
    roc_png: Annotated[Path | None, typer.Option("--roc-png", help="Write the ROC plot.")] = None,
    calibration_png: Annotated[
        Path | None, typer.Option("--calibration-png", help="Write the calibration plot.")
    ] = None,
    fmt: FormatOpt = Format.table,
) -> None:
    """Validation metrics against imported ground truth, with bootstrap CIs.

    Accuracy, sensitivity, specificity, PPV, NPV, F1 and ROC AUC, the confusion matrix
    and a calibration table, per group.
    """
    from sijnode.db.render import render_csv, render_json
    from sijnode.db.validation import GroupBy, compute_metrics

    flt = _filter(
        since=since,
        until=until,
        pipeline=pipeline,
        model_version=model_version,
        route=route,
        sender=sender,
        site=site,
        shadow=shadow,
    )
    with _session(ctx) as session:
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
        typer.echo(render_csv(_metrics_rows(result), cols).rstrip("\n"))
    else:
        _echo_metrics_table(result)
    if roc_png is not None or calibration_png is not None:
        from sijnode.db.plots import write_calibration_png, write_roc_png

        if roc_png is not None:
            write_roc_png(result.cases, result.reports, roc_png)
            typer.echo(f"wrote {roc_png}", err=True)
        if calibration_png is not None:
            write_calibration_png(result.reports, calibration_png)
            typer.echo(f"wrote {calibration_png}", err=True)


# --------------------------------------------------------------------------- truth


@truth_app.command("import")
def truth_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV file with the reference labels.")],
    replace: Annotated[
        bool, typer.Option(help="Replace labels already imported for the same study and reader.")
    ] = False,
) -> None:
    """Import reference labels from a CSV file: every row, or none if any row is bad."""
    from sijnode.db.truth import import_truth

    secret = _settings(ctx).database.pseudonym_secret
    with _session(ctx) as session:
        result = import_truth(session, file, secret, replace=replace)
    readers = ", ".join(r or "(none)" for r in result.readers)
    typer.echo(
        f"imported {result.rows} label(s) ({result.positives} positive) from {file}; "
        f"readers: {readers}" + (f"; replaced {result.replaced}" if result.replaced else "")
    )


def register(app: typer.Typer) -> None:
    """Add this part's commands to the ``sijnode`` app."""
    app.add_typer(db_app, name="db")
    app.add_typer(audit_app, name="audit")
