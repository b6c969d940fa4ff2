"""Routing: which series of a complete study go to which pipeline.

Routes are tried in the order of the settings. A route picks, among the series that meet
all of its criteria, the one with the most instances (ties: the lowest SeriesNumber),
because each pipeline reads one series. A study may match several routes (one job each);
a study that matches none is ignored with the reasons recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sijnode.db.schema import Series
from sijnode.settings import RouteSettings


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

    @classmethod
    def of(cls, series: Series, instances: int) -> SeriesFacts:
        """Facts of a series row with its count of distinct instances."""
        return cls(
            series.series_instance_uid,
            series.modality,
            series.body_part_examined,
            series.series_description,
            series.series_number,
            series.image_type,
            series.orientation,
            instances,
        )


@dataclass(frozen=True)
class RouteMatch:
    """A route and the series it selected."""

    route: RouteSettings
    series: SeriesFacts


def mismatch(route: RouteSettings, facts: SeriesFacts) -> str | None:
    """Why ``facts`` fails ``route``, or None if it matches."""
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
