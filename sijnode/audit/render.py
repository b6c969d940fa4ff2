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
from typing import Any


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
