"""When is a study complete? Judged from content first, timers as fallbacks.

Rules (docs/study-completion.md), checked for every study still receiving:

1. **Hard cap:** ``hard_cap_seconds`` after the study's first instance it is complete,
   whatever else holds (a sender that never stops must not stall the node).
2. **Content:** every series is complete by its content (below) and the study has been
   quiet for ``content_quiet_seconds`` → complete early.
3. **Quiet timer:** no instance for ``quiet_seconds`` → complete, even with gaps (the
   gaps are recorded with the completion).

A series is complete by content when it holds at least the count that
ImagesInAcquisition or NumberOfSeriesRelatedInstances announces. Without such a count it
is ``contiguous`` when InstanceNumbers run 1..N without a hole and slice positions are
evenly spaced along the normal, and ``gaps`` otherwise; both wait for the quiet timer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.schema import Instance, Series, Study, as_utc
from sijnode.settings import CompletionSettings


class SeriesContent(StrEnum):
    """What a series' own content says about its completeness."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    CONTIGUOUS = "contiguous"
    GAPS = "gaps"


@dataclass(frozen=True)
class Verdict:
    """Whether a study is complete now, and why."""

    complete: bool
    reason: str | None = None
    series: dict[str, SeriesContent] = field(default_factory=dict)


def series_content(
    expected: int | None,
    instance_numbers: list[int | None],
    positions: list[float | None],
) -> SeriesContent:
    """Judge one series from its announced count, InstanceNumbers and slice positions."""
    count = len(instance_numbers)
    if expected:
        return SeriesContent.COMPLETE if count >= expected else SeriesContent.INCOMPLETE
    numbers = sorted({n for n in instance_numbers if n is not None})
    if numbers and (numbers[0] != 1 or numbers[-1] - numbers[0] + 1 != len(numbers)):
        return SeriesContent.GAPS
    known = sorted({round(p, 3) for p in positions if p is not None})
    if len(known) >= 3:
        steps = np.diff(known)
        median = float(np.median(steps))
        if median > 0 and float(steps.max()) > 1.5 * median:
            return SeriesContent.GAPS
    return SeriesContent.CONTIGUOUS


def assess(session: Session, study: Study, rules: CompletionSettings, now: datetime) -> Verdict:
    """Decide whether ``study`` (state receiving) is complete at ``now``."""
    quiet = (now - as_utc(study.last_received_at)).total_seconds()
    earliest = min(rules.content_quiet_seconds, rules.quiet_seconds, rules.hard_cap_seconds)
    if quiet < earliest and (now - as_utc(study.first_received_at)).total_seconds() < earliest:
        # still arriving and young: no rule can hold yet, so skip reading its instances
        return Verdict(False)
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Series.expected_instances,
            Instance.sop_instance_uid,
            Instance.instance_number,
            Instance.slice_position,
            Instance.generation,
            Instance.received_at,
        )
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
    ).all()
    per_series: dict[str, tuple[int | None, dict[str, tuple[int | None, float | None]]]] = {}
    generation_start: datetime | None = None
    for series_uid, expected, sop_uid, number, position, generation, received in rows:
        _, instances = per_series.setdefault(series_uid, (expected, {}))
        instances[sop_uid] = (number, position)
        if generation == study.generation:
            received = as_utc(received)
            generation_start = min(generation_start or received, received)
    verdicts = {
        uid: series_content(expected, [n for n, _ in inst.values()], [p for _, p in inst.values()])
        for uid, (expected, inst) in per_series.items()
    }
    # The hard cap counts from the first instance of the current generation, so a study
    # reopened by late instances gets its quiet period again.
    start = generation_start or as_utc(
        study.first_received_at if study.generation == 1 else study.last_received_at
    )
    age = (now - start).total_seconds()
    if age >= rules.hard_cap_seconds:
        return Verdict(True, "hard_cap", verdicts)
    if verdicts and all(v is SeriesContent.COMPLETE for v in verdicts.values()):
        if quiet >= rules.content_quiet_seconds:
            return Verdict(True, "content", verdicts)
        return Verdict(False, None, verdicts)
    if quiet >= rules.quiet_seconds:
        gaps = any(v in (SeriesContent.GAPS, SeriesContent.INCOMPLETE) for v in verdicts.values())
        return Verdict(True, "quiet_timer_with_gaps" if gaps else "quiet_timer", verdicts)
    return Verdict(False, None, verdicts)
