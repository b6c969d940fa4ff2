"""The hot path commits an instance's row while its file is still being flushed
(sijnode.daemon.ingest, "The hot path commits early"): a study is never completed with a
row whose file is not in place, a failed flush leaves no row, and an identical copy sent
meanwhile waits for the first one's outcome."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from sijnode.daemon import staging
from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.schema import Event, EventType, Instance, Study, StudyState
from tests.nodes import count, node_settings, running_node, send, wait_for
from tests.studies import make_study

_real_fsync = os.fsync


def _is_staged(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(".part")
    except OSError:
        return False


@contextmanager
def staged_fsync(
    monkeypatch: pytest.MonkeyPatch, action: Callable[[int, int], None]
) -> Iterator[None]:
    """Run ``action(n, fd)`` before the n-th fsync of a staged (received) file."""
    calls = [0]
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        if _is_staged(fd):
            with lock:
                calls[0] += 1
                n = calls[0]
            action(n, fd)
        _real_fsync(fd)

    monkeypatch.setattr(staging.os, "fsync", fsync)
    yield


def _quick(tmp_path: Path) -> object:
    """Completion after one quiet second, judged by the node's own completion loop."""
    return node_settings(
        tmp_path,
        completion={
            "quiet_seconds": 1,
            "content_quiet_seconds": 1,
            "check_interval_seconds": 0.2,
        },
    )


def _study_state(node: Node, uid: str) -> StudyState | None:
    with node.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def test_a_failed_flush_on_the_hot_path_leaves_no_row_and_a_failure_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study("early-fail", n=5)

    def fail_third(n: int, fd: int) -> None:
        if n == 3:
            raise OSError(errno.EIO, "simulated I/O error")

    with running_node(_quick(tmp_path)) as node:  # type: ignore[arg-type]
        with staged_fsync(monkeypatch, fail_third):
            statuses = send(study, node.scp.port)
        assert statuses[:2] == [SUCCESS] * 2 and statuses[3:] == [SUCCESS] * 2
        assert statuses[2] not in (SUCCESS, -1)  # a failure status, the association went on
        failed = str(study[2].SOPInstanceUID)
        with node.sessions() as s:
            uids = set(s.scalars(select(Instance.sop_instance_uid)))
            paths = list(s.scalars(select(Instance.spool_path)))
        # exactly the acknowledged instances have rows, and every row has its file
        assert failed not in uids and len(uids) == 4
        assert all(node.spool.path(p).exists() for p in paths)
        assert len(node.spool.iter_files()) == 4
        # the study completes with what was acknowledged
        uid = str(study[0].StudyInstanceUID)
        wait_for(lambda: _study_state(node, uid) is StudyState.DISPATCHED)


def test_a_study_with_a_row_not_yet_in_place_is_not_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = make_study("early-hold", n=3)
    uid = str(study[0].StudyInstanceUID)
    gate, reached = threading.Event(), threading.Event()

    def hold_third(n: int, fd: int) -> None:
        if n == 3:
            reached.set()
            assert gate.wait(30)

    with running_node(_quick(tmp_path)) as node:  # type: ignore[arg-type]
        with staged_fsync(monkeypatch, hold_third), ThreadPoolExecutor(1) as pool:
            sent = pool.submit(send, study, node.scp.port)
            assert reached.wait(20)
            # the third row commits while its file is still being flushed ...
            wait_for(lambda: count(node, Instance) == 3)
            third = str(study[2].SOPInstanceUID)
            with node.sessions() as s:
                path = s.scalar(
                    select(Instance.spool_path).where(Instance.sop_instance_uid == third)
                )
            assert path is not None and not node.spool.path(path).exists()
            # ... and the study is not judged complete, long after its quiet second
            time.sleep(3)
            assert _study_state(node, uid) is StudyState.RECEIVING
            gate.set()
            assert sent.result(30) == [SUCCESS] * 3
        assert node.spool.path(path).exists()
        wait_for(lambda: _study_state(node, uid) is StudyState.DISPATCHED)


@pytest.mark.parametrize("first_fails", [False, True])
def test_an_identical_copy_sent_meanwhile_waits_for_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_fails: bool
) -> None:
    """Two associations send the same bytes; the second finds the first's row committed
    but its file not placed yet: it waits, and answers with the first one's outcome."""
    study = make_study("early-twin", n=2)
    gate, reached = threading.Event(), threading.Event()

    def hold_first_copy(n: int, fd: int) -> None:
        if n == 1:
            reached.set()
            assert gate.wait(30)
            if first_fails:
                raise OSError(errno.EIO, "simulated I/O error")

    settings = node_settings(tmp_path, completion={"quiet_seconds": 600})
    with running_node(settings) as node:
        assert send(study[:1], node.scp.port) == [SUCCESS]  # the series is known now
        with staged_fsync(monkeypatch, hold_first_copy), ThreadPoolExecutor(2) as pool:
            first = pool.submit(send, study[1:], node.scp.port)
            assert reached.wait(20)
            wait_for(lambda: count(node, Instance) == 2)
            twin = pool.submit(send, study[1:], node.scp.port)
            wait_for(lambda: count(node, Event, Event.type == EventType.INSTANCE_DUPLICATE) == 1)
            assert not twin.done()  # it waits for the first copy's flush
            gate.set()
            statuses = first.result(30) + twin.result(30)
        files = node.spool.iter_files()
        with node.sessions() as s:
            rows = list(s.scalars(select(Instance.spool_path)))
        assert sorted(rows) == files  # every row has its file, every file its row
        if first_fails:
            assert all(status != SUCCESS for status in statuses)
            assert len(rows) == 1
        else:
            assert statuses == [SUCCESS, SUCCESS]
            assert len(rows) == 2


def test_a_row_whose_delete_failed_holds_its_study_until_the_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush fails and so does the delete of its row (the audit is down, simulated,
    until the test lets it recover): the study is held back while the row is there; once
    the audit answers, the completion loop's own retry removes the row and the study is
    no longer held, with the acknowledged instances only."""
    from sijnode.daemon.ingest import Ingestor

    study = make_study("early-owed", n=3)
    uid = str(study[0].StudyInstanceUID)
    real = Ingestor._unrecord
    audit_up = threading.Event()
    calls: list[bool] = []

    def flaky(self: Ingestor, unplaced: object) -> bool:
        calls.append(audit_up.is_set())
        return real(self, unplaced) if audit_up.is_set() else False  # type: ignore[arg-type]

    real_hold = Ingestor._hold
    held_early = threading.Event()

    def hold(self: Ingestor, relpath: str, unplaced: object) -> None:
        real_hold(self, relpath, unplaced)  # type: ignore[arg-type]
        held_early.set()

    def fail_third(n: int, fd: int) -> None:
        if n == 3:
            # fail once the row is on its way to commit (the early-commit path): a flush
            # that failed before that is refused without a row (the other tests)
            held_early.wait(10)
            raise OSError(errno.EIO, "simulated I/O error")

    settings = node_settings(
        tmp_path, completion={"quiet_seconds": 600, "check_interval_seconds": 0.2}
    )
    with running_node(settings) as node:
        monkeypatch.setattr(Ingestor, "_unrecord", flaky)
        with staged_fsync(monkeypatch, fail_third):
            statuses = send(study[:2], node.scp.port)
            monkeypatch.setattr(Ingestor, "_hold", hold)  # the third instance's hold
            statuses += send(study[2:], node.scp.port)
        assert statuses[2] not in (SUCCESS, -1) and statuses.count(SUCCESS) == 2
        wait_for(lambda: len(calls) >= 3, timeout=30)  # the loop has retried, in vain
        assert count(node, Instance) == 3  # the failed instance's row is still there
        with node.ingestor.writer_turn() as held:
            assert len(held) == 1  # its study is held back
        audit_up.set()
        wait_for(lambda: count(node, Instance) == 2, timeout=30)  # the loop's retry
        assert calls[-1] is True

        def held_now() -> frozenset[int]:
            with node.ingestor.writer_turn() as held:
                return held

        wait_for(lambda: held_now() == frozenset(), timeout=10)
        assert _study_state(node, uid) is StudyState.RECEIVING
