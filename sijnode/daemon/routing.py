"""Routing: which series of a complete study go to which pipeline.

Routes are tried in the order of the settings. A route picks, among the series that meet
all of its criteria, the one with the most instances (ties: the lowest SeriesNumber),
because each pipeline reads one series. A study may match several routes (one job each);
a study that matches none is ignored with the reasons recorded.

The listener stores every storage SOP class it is sent, private and non-image ones too
(Siemens CSA Non-Image, presentation states, reports). A series none of whose instances
is of a SOP class a pipeline reads (:data:`PIPELINE_SOP_CLASSES`) is never selected; the
reason is logged, and recorded with the study when it is ignored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from pydicom.uid import CTImageStorage, MRImageStorage
from sqlalchemy import select
from sqlalchemy.orm import object_session

from sijnode.db.schema import Instance, Series
from sijnode.logs import fields
from sijnode.settings import RouteSettings

log = logging.getLogger(__name__)

#: The SOP classes each pipeline reads: single-frame slices (PROTOCOLS.md; the CT
#: pipeline classifies axial CT slices, the MR pipeline a stack of MR slices).
PIPELINE_SOP_CLASSES: dict[str, frozenset[str]] = {
    "ct": frozenset({str(CTImageStorage)}),
    "mr": frozenset({str(MRImageStorage)}),
}
_READ_BY_ANY = frozenset().union(*PIPELINE_SOP_CLASSES.values())


@dataclass(frozen=True)
class SeriesFacts:
    """What routing looks at for one series."""

    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    image_type: str | None
    orientation: str | None
    instances: int
    #: The SOP classes of the series' instances (empty: not known).
    sop_classes: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, series: Series, instances: int) -> SeriesFacts:
        """Facts of a series row with its count of distinct instances (and, if the row
        is attached to a session, the SOP classes of its instances)."""
        session = object_session(series)
        classes: frozenset[str] = frozenset()
        if session is not None:
            classes = frozenset(
                session.scalars(
                    select(Instance.sop_class_uid).where(Instance.series_id == series.id).distinct()
                ).all()
            )
        return cls(
            series.series_instance_uid,
            series.modality,
            series.body_part_examined,
            series.series_description,
            series.series_number,
            series.image_type,
            series.orientation,
            instances,
            classes,
        )

    def unread(self, pipeline: str) -> str | None:
        """Why ``pipeline`` cannot read this series' SOP classes, or None if it can."""
        if not self.sop_classes:
            return None
        names = ", ".join(sorted(self.sop_classes))
        if not self.sop_classes & _READ_BY_ANY:
            return f"SOP class {names}: no pipeline reads it (a non-image or private object)"
        wanted = PIPELINE_SOP_CLASSES.get(pipeline)
        if wanted is not None and not self.sop_classes & wanted:
            return f"SOP class {names} is not read by the {pipeline} pipeline"
        return None


@dataclass(frozen=True)
class RouteMatch:
    """A route and the series it selected."""

    route: RouteSettings
    series: SeriesFacts


def mismatch(route: RouteSettings, facts: SeriesFacts) -> str | None:
    """Why ``facts`` fails ``route``, or None if it matches."""
    unread = facts.unread(route.pipeline)
    if unread is not None:
        return unread
    if (facts.modality or "").upper() != route.modality.upper():
        return f"modality {facts.modality or 'missing'} is not {route.modality}"
    if route.body_part and (facts.body_part_examined or "").upper() not in {
        b.upper() for b in route.body_part
    }:
        return f"body part {facts.body_part_examined or 'missing'} not in {route.body_part}"
    if route.series_description and not re.search(
        route.series_description, facts.series_description or "", re.IGNORECASE
    ):
        return f"series description does not match /{route.series_description}/"
    if route.image_type_original and not (facts.image_type or "").upper().startswith("ORIGINAL"):
        return f"image type {facts.image_type or 'missing'} is not ORIGINAL"
    if route.orientation != "any" and facts.orientation != route.orientation:
        return f"orientation {facts.orientation or 'unknown'} is not {route.orientation}"
    if facts.instances < route.min_slices:
        return f"{facts.instances} instances, fewer than {route.min_slices}"
    if route.max_slices and facts.instances > route.max_slices:
        return f"{facts.instances} instances, more than {route.max_slices}"
    return None


def route_study(
    routes: list[RouteSettings], series: list[SeriesFacts]
) -> tuple[list[RouteMatch], list[str]]:
    """Return the matches, and for an unmatched study the reasons per route and series."""
    matches: list[RouteMatch] = []
    reasons: list[str] = []
    for facts in series:
        if facts.sop_classes and not facts.sop_classes & _READ_BY_ANY:
            log.info(
                "series not routed",
                extra=fields(
                    series_instance_uid=facts.series_instance_uid,
                    reason=facts.unread(""),
                ),
            )
    for route in routes:
        candidates = []
        for facts in series:
            why = mismatch(route, facts)
            if why is None:
                candidates.append(facts)
            else:
                reasons.append(f"route {route.name}: series #{facts.series_number}: {why}")
        if candidates:
            best = max(candidates, key=lambda f: (f.instances, -(f.series_number or 0)))
            matches.append(RouteMatch(route, best))
    if not routes:
        reasons.append("no routes are configured")
    return matches, ([] if matches else reasons)
