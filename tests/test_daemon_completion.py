"""Study completion rules (docs/study-completion.md), with the clock passed in."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from sijnode.daemon.completion import SeriesContent, series_content
from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import as_utc
from sijnode.db.schema import Job, Study, StudyState, utcnow
from tests.nodes import node_settings, running_node, send
from tests.studies import make_series


@pytest.mark.parametrize(
    ("expected", "numbers", "positions", "verdict"),
    [
        (4, [1, 2, 3, 4], [0, 2, 4, 6], SeriesContent.COMPLETE),
        (4, [1, 2, 3], [0, 2, 4], SeriesContent.INCOMPLETE),
        (None, [1, 2, 3, 4], [0, 2, 4, 6], SeriesContent.CONTIGUOUS),
        (None, [1, 2, 4, 5], [0, 2, 6, 8], SeriesContent.GAPS),
        (None, [2, 3, 4], [2, 4, 6], SeriesContent.GAPS),
        (None, [1, 2, 3, 4], [0, 2, 8, 10], SeriesContent.GAPS),
        (None, [None, None, None], [None, None, None], SeriesContent.CONTIGUOUS),
    ],
)
def test_series_content(expected, numbers, positions, verdict) -> None:
    assert series_content(expected, numbers, positions) is verdict


def _reason(node, uid: str) -> str | None:
    with node.sessions() as s:
        return s.scalars(
            select(Study.completion_reason).where(Study.study_instance_uid == uid)
        ).one()


@pytest.mark.parametrize(
    ("after", "reason"),
    [(599, None), (601, "quiet_timer"), (1001, "hard_cap")],
)
def test_timers(tmp_path: Path, after: float, reason: str | None) -> None:
    settings = node_settings(
        tmp_path,
        completion={
            "quiet_seconds": 600,
            "content_quiet_seconds": 300,
            "hard_cap_seconds": 1000,
            "check_interval_seconds": 3600,
        },
    )
    uid = "1.2.826.0.1.3680043.8.498.77"
    series = make_series("timers", uid, 1, 3, images_in_acquisition=None)
    with running_node(settings) as node:
        assert send(series, node.scp.port) == [SUCCESS] * 3
        # nothing happens by itself: the loop interval is an hour
        assert node.check_studies() == []
        # measured from the last instance, not from now (a loaded machine may take seconds)
        with node.sessions() as s:
            last = as_utc(s.scalars(select(Study)).one().last_received_at)
        now = last + timedelta(seconds=after)
        if reason == "hard_cap":
            # keep the study busy so only the hard cap can end it
            with node.sessions.begin() as s:
                s.scalars(select(Study)).one().last_received_at = now
        done = node.check_studies(now=now)
        assert (len(done) == 1) == (reason is not None)
        assert _reason(node, uid) == reason


def test_content_completes_before_the_quiet_timer(tmp_path: Path) -> None:
    settings = node_settings(
        tmp_path,
        completion={
            "quiet_seconds": 600,
            "content_quiet_seconds": 5,
            "check_interval_seconds": 3600,
        },
    )
    uid = "1.2.826.0.1.3680043.8.498.78"
    series = make_series("content", uid, 1, 4)
    with running_node(settings) as node:
        assert send(series[:3], node.scp.port) == [SUCCESS] * 3
        assert node.check_studies(now=utcnow() + timedelta(seconds=10)) == []
        assert send(series[3:], node.scp.port) == [SUCCESS]
        assert node.check_studies(now=utcnow() + timedelta(seconds=2)) == []
        assert len(node.check_studies(now=utcnow() + timedelta(seconds=6))) == 1
        assert _reason(node, uid) == "content"


def test_a_study_reopened_before_dispatch_is_not_dispatched(tmp_path: Path) -> None:
    """A late instance between completion and dispatch: the study is judged again."""
    settings = node_settings(tmp_path, completion={"check_interval_seconds": 3600})
    uid = "1.2.826.0.1.3680043.8.498.79"
    series = make_series("race", uid, 1, 3)
    with running_node(settings) as node:
        assert send(series[:2], node.scp.port) == [SUCCESS] * 2
        with transaction(node.sessions) as s:
            study = s.scalars(select(Study)).one()
            transition(s, study, StudyState.COMPLETE, "content")
        assert send(series[2:], node.scp.port) == [SUCCESS]  # reopens it
        with node.sessions() as s:
            study = s.scalars(select(Study)).one()
        assert (study.state, study.generation) == (StudyState.RECEIVING, 2)
        result = node.dispatcher.dispatch_study(study.id)
        assert (result.created, result.duplicates) == ([], [])
        with node.sessions() as s:
            assert s.scalars(select(Study)).one().state is StudyState.RECEIVING
            assert s.scalar(select(func.count()).select_from(Job)) == 0
        assert len(node.check_studies(now=utcnow() + timedelta(seconds=10))) == 1
        with node.sessions() as s:
            assert s.scalars(select(Study)).one().state is StudyState.DISPATCHED
            (job,) = s.scalars(select(Job)).all()
        assert len(job.spool_paths) == 3 and job.study_generation == 2
