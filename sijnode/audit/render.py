"""Rows to text: an aligned table for people, JSON and CSV for programs.

Every ``sijnode audit`` listing is a list of flat dicts with the same keys; this module
turns it into one of three formats so the commands stay thin.
"""

from __future__ import annotations

import csv
import enum
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sijnode.audit.validation import ValidationResult


class OutputFormat(enum.StrEnum):
    """How a listing is printed."""

    table = "table"
    json = "json"
    csv = "csv"


class FileFormat(enum.StrEnum):
    """How an export is written."""

    csv = "csv"
    json = "json"


Row = Mapping[str, Any]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def json_value(value: Any) -> Any:
    """A JSON-safe copy of ``value``: ISO 8601 UTC times, enum values, NaN as null."""
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


def text_value(value: Any) -> str:
    """How a value shows in a table or CSV cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _utc(value).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(json_value(value), separators=(",", ":"))
    return str(value)


def _csv_value(value: Any) -> str:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return text_value(value)


def _columns(rows: Sequence[Row], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def render_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """An aligned plain-text table; ``(no rows)`` when empty."""
    cols = _columns(rows, columns)
    if not rows:
        return "(no rows)"
    cells = [[text_value(row.get(c)) for c in cols] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )
    return "\n".join(lines)


def render_json(data: Any) -> str:
    """Indented JSON of rows or a report."""
    return json.dumps(json_value(data), indent=2)


def render_csv(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """CSV with a header row; nested values are written as compact JSON."""
    cols = _columns(rows, columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_value(row.get(c)) for c in cols])
    return buffer.getvalue()


def render(
    rows: Sequence[Row], fmt: OutputFormat | str, columns: Sequence[str] | None = None
) -> str:
    """Rows in the requested format."""
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.json:
        return render_json([{c: row.get(c) for c in _columns(rows, columns)} for row in rows])
    if fmt is OutputFormat.csv:
        return render_csv(rows, columns).rstrip("\n")
    return render_table(rows, columns)


def metrics_rows(result: ValidationResult) -> list[dict[str, Any]]:
    """``audit metrics --format csv``: one row per count, metric and calibration bin."""
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


def metrics_table(result: ValidationResult) -> str:
    """``audit metrics`` for people: per group the metrics with their intervals, the
    confusion matrix and the calibration table."""
    lines: list[str] = []
    excluded = ", ".join(f"{k} {v}" for k, v in sorted(result.excluded.items()))
    if not result.reports:
        lines.append("no studies with both a result and a reference label match the filters")
    for r in result.reports:
        pct = f"{round(100 * r.confidence)}%"
        lines.append(
            f"group {r.group}: n={r.n} (truth positive {r.positives}, negative {r.negatives}); "
            f"{pct} CI: percentile bootstrap, {r.n_resamples} resamples, seed {r.seed}"
        )
        lines.append(
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
        lines.append("")
        lines.append(
            render_table(
                [
                    {"": "predicted positive", "truth positive": c.tp, "truth negative": c.fp},
                    {"": "predicted negative", "truth positive": c.fn, "truth negative": c.tn},
                ]
            )
        )
        lines.append(f"\nCalibration (Brier score {text_value(r.brier)})")
        lines.append(
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
        lines.append("")
    if excluded:
        lines.append(f"left out: {excluded}")
    return "\n".join(lines)
