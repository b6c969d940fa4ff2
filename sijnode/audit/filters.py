"""The filters of the audit listings: one frozen dataclass, declared once.

:class:`AuditFilter` holds plain values (no SQL), so the command line builds it without
importing SQLAlchemy; :mod:`sijnode.audit.queries` turns it into conditions, and
:mod:`sijnode.audit.options` declares its command-line options.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sijnode.db.schema import DeliveryStatus


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_when(text: str | None, *, end: bool = False) -> datetime | None:
    """Parse ``--since``/``--until``: an ISO 8601 date or date-time, UTC when no offset.

    A bare date means the start of that day; with ``end`` it means the start of the
    next day, so ``--until 2026-03-31`` includes all of 31 March.
    """
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        return _as_utc(datetime.fromisoformat(text))
    except ValueError as exc:
        raise ValueError(
            f"expected an ISO 8601 date (2026-03-31) or date-time (2026-03-31T14:00), got {text!r}"
        ) from exc


@dataclass(frozen=True)
class AuditFilter:
    """Filters shared by the audit listings; ``None`` means any.

    ``since`` is inclusive and ``until`` exclusive. For studies the time is
    ``first_received_at``; for jobs ``created_at``. ``state`` is a study state for
    study lists and a job state for job lists. ``sender`` is the calling AE title.
    """

    since: datetime | None = None
    until: datetime | None = None
    pipeline: str | None = None
    model_version: str | None = None
    route: str | None = None
    state: str | None = None
    sender: str | None = None
    site: str | None = None
    delivery: DeliveryStatus | None = None
    shadow: bool | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError(
                f"expected --until after --since, got since={self.since.isoformat()} "
                f"until={self.until.isoformat()}"
            )
        if self.delivery is not None:
            from sijnode.db.schema import DeliveryStatus

            object.__setattr__(self, "delivery", DeliveryStatus(self.delivery))
