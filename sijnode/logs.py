"""Structured logging: JSON lines with event fields, never patient identifiers.

Log calls pass UIDs, counts and reasons as ``extra={"fields": {...}}``. PatientName,
PatientID and AccessionNumber are never handed to a logger anywhere in sijnode.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``fields`` extra."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    """Configure the root logger once for a process (called by ``serve`` and ``worker``)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG/INFO and may print identifiers from datasets.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    quiet_dataset_values()


def quiet_dataset_values() -> None:
    """Keep element values out of logs: pydicom reports a value it cannot validate with the
    value itself (``Invalid value for VR DA: '1990-01-0x'``), which may be a patient's.
    Reading stays tolerant (PS3.5 values are kept as received); only the report is off."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def fields(**values: Any) -> dict[str, Any]:
    """Shorthand for ``extra={"fields": values}``."""
    return {"fields": values}
