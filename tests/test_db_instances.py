"""The listener's rows (db/instances.py): one round trip per known-series instance, series
cached per study, and a transaction's cache entries kept only once it commits."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from sijnode.daemon.header import read_header
from sijnode.daemon.keys import read_keys
from sijnode.daemon.spool import content_hash
from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.instances import (
    IngestOutcome,
    IngestResult,
    InstanceKeysLike,
    InstanceRecorder,
    NeedHeader,
    PendingRows,
)
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Event, EventType, Instance, Series, Study, utcnow
from sijnode.settings import DatabaseSettings
from tests.studies import encode, make_series

STUDY_A = "1.2.826.0.1.3680043.8.498.9201"
STUDY_B = "1.2.826.0.1.3680043.8.498.9202"


class _Audit:
    def __init__(self, url: str) -> None:
        upgrade(url)
        self.engine = make_engine(url)
        self.sessions = make_sessionmaker(self.engine)
        self.recorder = InstanceRecorder(
            DatabaseSettings(url=url, pseudonym_secret="s"), "t", self._relpath
        )
        self.statements: list[str] = []

        @event.listens_for(self.engine, "connect")
        def _trace(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # every statement SQLite runs, also those sent on the raw cursor
            dbapi_conn.set_trace_callback(self.statements.append)

    @staticmethod
    def _relpath(study: str, series: str, sop: str, sha: str) -> str:
        return f"{study}/{series}/{sop}.{sha[:16]}.dcm"

    def record(self, ds: Dataset, header: InstanceKeysLike | None = None) -> IngestResult:
        data = encode(ds)
        header = header or read_header(data)
        with transaction(self.sessions) as session:
            pending = PendingRows()
            result = self.recorder.record(
                session,
                pending,
                header,
                lambda: content_hash(data),
                len(data),
                None,
                None,
                "AE",
                utcnow(),
            )
        self.recorder.remember(pending)
        return result


@pytest.fixture
def audit(sqlite_url: str) -> Iterator[_Audit]:
    a = _Audit(sqlite_url)
    yield a
    a.engine.dispose()


def _writes(statements: list[str]) -> list[str]:
    return [s.split()[0].upper() for s in statements if not s.startswith(("BEGIN", "COMMIT"))]


def test_a_new_instance_of_a_known_series_is_one_round_trip(audit: _Audit) -> None:
    series = make_series("round-trip", STUDY_A, 1, 3)
    assert audit.record(series[0]).outcome is IngestOutcome.STORED
    for ds in series[1:]:
        audit.statements.clear()
        assert audit.record(ds, read_keys(encode(ds))).outcome is IngestOutcome.STORED
        # the SOP UID lookup, the study's touch and the instance row: nothing else
        assert _writes(audit.statements) == ["SELECT", "UPDATE", "INSERT"]


def test_series_are_cached_per_study(audit: _Audit) -> None:
    """The same series UID under a second study never takes the first study's row."""
    series_a = make_series("cache-a", STUDY_A, 1, 2)
    series_b = make_series("cache-b", STUDY_B, 1, 2)
    for ds in series_b:
        ds.SeriesInstanceUID = series_a[0].SeriesInstanceUID
    audit.record(series_a[0])
    audit.record(series_b[0])
    # both series known now: the keys alone take the fast path, each into its own row
    for ds in (series_a[1], series_b[1]):
        audit.record(ds, read_keys(encode(ds)))
    with audit.sessions() as s:
        owners = s.execute(
            select(Study.study_instance_uid, Series.id, func.count(Instance.id))
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .group_by(Study.study_instance_uid, Series.id)
            .order_by(Study.study_instance_uid)
        ).all()
        assert [(uid, n) for uid, _, n in owners] == [(STUDY_A, 2), (STUDY_B, 2)]
        assert owners[0][1] != owners[1][1]
        mixed = s.scalar(
            select(func.count(Instance.id))
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id != Instance.study_id)
        )
        assert mixed == 0
        reused = s.scalars(select(Event).where(Event.type == EventType.SERIES_UID_REUSED)).one()
        assert reused.detail["series_instance_uid"] == str(series_a[0].SeriesInstanceUID)


def test_keys_alone_cannot_create_a_series(audit: _Audit) -> None:
    first = make_series("keys", STUDY_A, 1, 1)[0]
    other_series = make_series("keys", STUDY_A, 2, 1)[0]
    audit.record(first)
    with pytest.raises(NeedHeader, match="a new series"), transaction(audit.sessions) as s:
        data = encode(other_series)
        audit.recorder.record(
            s,
            PendingRows(),
            read_keys(data),
            lambda: content_hash(data),
            1,
            None,
            None,
            None,
            utcnow(),
        )
    assert not audit.recorder.knows(STUDY_A, str(other_series.SeriesInstanceUID))


def test_a_rolled_back_transaction_teaches_the_caches_nothing(audit: _Audit) -> None:
    ds = make_series("rollback", STUDY_A, 1, 1)[0]
    data = encode(ds)
    session: Session
    with pytest.raises(RuntimeError), transaction(audit.sessions) as session:
        pending = PendingRows()
        audit.recorder.record(
            session,
            pending,
            read_header(data),
            lambda: content_hash(data),
            1,
            None,
            None,
            None,
            utcnow() - timedelta(seconds=1),
        )
        assert pending.entries  # the study and series ids it would cache
        raise RuntimeError("the commit never happens")
    assert not audit.recorder.knows(STUDY_A, str(ds.SeriesInstanceUID))
    with audit.sessions() as s:
        assert s.scalar(select(func.count(Study.id))) == 0
