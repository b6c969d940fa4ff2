"""What one try of a delivery came to, and how DIMSE and HTTP statuses are classified.

Transient failures are tried again with backoff; permanent ones are recorded and not
retried (PS3.4 B.2.3 C-STORE statuses, PS3.7 C.4, PS3.18 10.5 STOW-RS statuses).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Outcome(enum.StrEnum):
    """The outcome of one attempt."""

    DELIVERED = "delivered"
    #: Stored; the peer's Storage Commitment result is awaited (PS3.4 J.3.3).
    COMMITTING = "committing"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass
class AttemptResult:
    """One attempt: its outcome, what the peer acknowledged and why it failed."""

    outcome: Outcome
    #: SOP Instance UIDs the peer acknowledged (Success or Warning) in this attempt.
    acknowledged: list[str] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    #: SOP class used per SOP Instance UID (the SR class chosen after negotiation).
    sop_classes: dict[str, str] = field(default_factory=dict)
    commitment_transaction_uid: str | None = None


#: C-STORE warnings (PS3.4 B.2.3): the object was stored.
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})
#: General failures that will not change by trying again (PS3.7 C.4).
_PERMANENT = frozenset(
    {0x0105, 0x0106, 0x0117, 0x0112, 0x0118, 0x0119, 0x0122, 0x0124, 0x0211, 0x0212}
)


def classify_dimse_status(status: int) -> Outcome:
    """Success/Warning -> delivered; 0xA7xx and other failures -> transient;
    0xA9xx, 0xCxxx and 'SOP class not supported'-like statuses -> permanent."""
    if status == 0x0000 or status in _WARNINGS:
        return Outcome.DELIVERED
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in _PERMANENT:
        return Outcome.PERMANENT
    return Outcome.TRANSIENT


def classify_http_status(status: int) -> Outcome:
    """2xx -> delivered; 408, 429 and 5xx -> transient; other 4xx -> permanent."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if status in (408, 425, 429) or status >= 500:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT
