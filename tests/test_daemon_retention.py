"""Spool retention with a real node: files of finished studies go, the audit stays whole.

Real DICOM peers (pynetdicom), real SQLite and PostgreSQL, a real tmpfs for disk
pressure (needs root, as in CI), and a real ``sijnode serve`` process killed with
SIGKILL during a sweep.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage
from pynetdicom import AE
from sqlalchemy import select
from typer.testing import CliRunner

from sijnode.audit.queries import study_timeline
from sijnode.daemon import spool_cli
from sijnode.daemon.node import Node
from sijnode.daemon.retention import SpoolState
from sijnode.daemon.scp import SUCCESS
from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.records import record_output
from sijnode.db.schema import (
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    Output,
    OutputKind,
    RemovalStatus,
    SpoolRemoval,
    Study,
    StudyState,
    as_utc,
)
from sijnode.settings import Settings
from tests.conftest import free_port
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import dataset_part, encode, make_series, make_study

OUT_OF_RESOURCES = 0xA700
SIJNODE = str(Path(sys.executable).parent / "sijnode")


def _fast(tmp_path: Path, db_url: str | None = None, **storage: Any) -> Settings:
    return node_settings(tmp_path, db_url, storage={"sweep_interval_seconds": 0.2, **storage})


def _uid(seed: str) -> str:
    return f"1.2.826.0.1.3680043.8.498.{zlib.crc32(seed.encode())}"


def _unrouted(seed: str, n: int = 3, rows: int = 32) -> list[Dataset]:
    """A study no route takes (modality OT): routing ignores it."""
    study = make_series(seed, _uid(seed), 1, n, rows=rows)
    for ds in study:
        ds.Modality = "OT"
    return study


def _study_id(node: Node, uid: str) -> int:
    with node.sessions() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_instance_uid == uid))
    assert study_id is not None, f"study {uid} not in the audit"
    return int(study_id)


def _state(node: Node, study_id: int) -> StudyState:
    with node.sessions() as s:
        return s.get_one(Study, study_id).state


def _instances(node: Node, study_id: int) -> list[Instance]:
    with node.sessions() as s:
        return list(s.scalars(select(Instance).where(Instance.study_id == study_id)))


def _all_removed(node: Node, study_id: int) -> bool:
    rows = _instances(node, study_id)
    return bool(rows) and all(r.removed_at is not None for r in rows)


def _jobs(node: Node, study_id: int) -> list[Job]:
    with node.sessions() as s:
        return list(s.scalars(select(Job).where(Job.study_id == study_id).order_by(Job.id)))


def _purged_events(node: Node, study_id: int) -> list[Event]:
    with node.sessions() as s:
        return list(
            s.scalars(
                select(Event).where(
                    Event.type == EventType.SPOOL_PURGED, Event.study_id == study_id
                )
            )
        )


def test_ignored_study_is_removed_after_its_retention_and_the_audit_says_when_and_why(
    tmp_path: Path, db_url: str
) -> None:
    settings = _fast(tmp_path, db_url, retention="2s")
    study = _unrouted("retention-ignored", n=3)
    uid = str(study[0].StudyInstanceUID)
    with running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3
        study_id = _study_id(node, uid)
        wait_for(lambda: _state(node, study_id) is StudyState.IGNORED)
        with node.sessions() as s:
            ignored_at = as_utc(s.get_one(Study, study_id).completed_at)
        paths = [node.spool.path(r.spool_path) for r in _instances(node, study_id)]
        assert all(p.is_file() for p in paths)
        wait_for(lambda: _all_removed(node, study_id), timeout=30)
        rows = _instances(node, study_id)
        assert len(rows) == 3, "the instance rows stay"
        for row in rows:
            assert row.removed_reason == "retention"
            assert as_utc(row.removed_at) >= ignored_at + timedelta(seconds=2)
            assert not node.spool.path(row.spool_path).exists()
        assert not (node.spool.root / uid).exists(), "the emptied study directory goes too"
        (event,) = _purged_events(node, study_id)
        assert event.detail["instances"] == 3
        assert event.detail["bytes"] == sum(r.size_bytes for r in rows)
        assert event.detail["reason"] == "retention"
        with node.sessions() as s:
            (removal,) = s.scalars(select(SpoolRemoval)).all()
            timeline = study_timeline(s, uid)
        assert removal.status == RemovalStatus.DONE and removal.files == 3
        stages = [entry["stage"] for entry in timeline]
        assert "event:spool_purged" in stages, stages
        registry = node.metrics.registry
        assert (
            registry.get_sample_value("sijnode_spool_files_removed_total", {"reason": "retention"})
            == 3
        )
        assert registry.get_sample_value("sijnode_spool_free_bytes") > 0


def _move(node: Node, job_id: int, *states: JobState) -> None:
    with transaction(node.sessions) as s:
        job = s.get_one(Job, job_id)
        for state in states:
            transition(s, job, state, "test: delivery retrying")


def _invoke(settings: Settings, *args: str) -> Any:
    import typer

    app = typer.Typer()
    spool_cli.register(app, lambda overrides=None: settings)
    return CliRunner().invoke(app, ["spool", *args])


def test_studies_whose_jobs_wait_are_kept_and_an_ignored_one_goes(tmp_path: Path) -> None:
    """A job in no_model, and one whose delivery is retrying (reported), keep their
    study's files past storage.retention; a study ignored meanwhile is removed."""
    settings = _fast(tmp_path, retention="1s")
    waiting = make_study("retention-no-model", n=3)
    retrying = make_study("retention-retrying", n=3)
    ignored = _unrouted("retention-control", n=2)
    with running_node(settings) as node:
        assert send(waiting, node.scp.port) == [SUCCESS] * 3
        assert send(retrying, node.scp.port) == [SUCCESS] * 3
        no_model_id = _study_id(node, str(waiting[0].StudyInstanceUID))
        retrying_id = _study_id(node, str(retrying[0].StudyInstanceUID))
        for study_id in (no_model_id, retrying_id):
            wait_for(
                lambda sid=study_id: [j.state for j in _jobs(node, sid)] == [JobState.NO_MODEL]
            )
        (job,) = _jobs(node, retrying_id)
        # a model appears, the job runs, its report is recorded, its delivery retries
        _move(node, job.id, JobState.RUNNING, JobState.INFERRED, JobState.REPORTED)
        _move(node, job.id, JobState.REPORTED)
        assert send(ignored, node.scp.port) == [SUCCESS] * 2
        control = _study_id(node, str(ignored[0].StudyInstanceUID))
        wait_for(lambda: _all_removed(node, control), timeout=30)
        time.sleep(1.5)  # more sweeps, all past storage.retention
        status = {s.study_id: s for s in node.retention.status().studies}
        for study_id in (no_model_id, retrying_id):
            rows = _instances(node, study_id)
            assert rows and all(r.removed_at is None for r in rows)
            assert all(node.spool.path(r.spool_path).is_file() for r in rows)
            assert status[study_id].state is SpoolState.WAITING
            assert status[study_id].verdict.due_at is not None  # storage.retention_waiting
        assert control not in status
        # by hand: the same rules; a waiting study is refused, with the reason
        result = _invoke(settings, "purge", "--study", str(waiting[0].StudyInstanceUID))
        assert result.exit_code != 0
        assert "waiting" in str(result.exception)
        shown = _invoke(settings, "status", "--json")
        assert shown.exit_code == 0, shown.output
        report = json.loads(shown.output)
        assert report["studies"]["waiting"] == 2 and report["studies"]["eligible"] == 0
        assert report["bytes"]["waiting"] == sum(
            r.size_bytes for sid in (no_model_id, retrying_id) for r in _instances(node, sid)
        )
        assert report["free_bytes"] > 0
        # the delivery succeeds: the study is final, its inputs and its SR file then go
        sr = node.settings.data_dir / "outputs" / "sr-1.dcm"  # where the worker writes
        sr.parent.mkdir(parents=True)
        sr.write_bytes(b"an SR the node wrote" * 10)
        with transaction(node.sessions) as s:
            job_row = s.get_one(Job, job.id)
            record_output(
                s,
                job_row,
                OutputKind.SR,
                ComprehensiveSRStorage,
                "1.2.826.0.1.3680043.8.498.99",
                "1.2.826.0.1.3680043.8.498.98",
                "outputs/sr-1.dcm",
            )
        assert _invoke(settings, "status", "--json").exit_code == 0
        time.sleep(1.5)
        assert sr.is_file(), "kept while the delivery retries"
        _move(node, job.id, JobState.DELIVERED)
        wait_for(lambda: _all_removed(node, retrying_id), timeout=30)
        with node.sessions() as s:
            (output,) = s.scalars(select(Output)).all()
        assert output.removed_reason == "retention" and not sr.exists()
        (event,) = _purged_events(node, retrying_id)
        assert event.detail["instances"] == 3 and event.detail["outputs"] == 1
        assert event.detail["bytes"] == 3 * _instances(node, retrying_id)[0].size_bytes + 200
        assert all(r.removed_at is None for r in _instances(node, no_model_id))


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (needs root, as in CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-pressure test: {proc.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_pressure_removes_finished_studies_oldest_first_never_a_waiting_one(
    tmp_path: Path, small_filesystem: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _fast(
        tmp_path,
        spool_dir=str(small_filesystem / "spool"),
        min_free_mb=1,
        purge_below_free_mb=4,
        retention="1h",  # nothing is due by retention: only disk pressure removes
    )

    # 12 slices of 256×256 int16: about 1.5 MiB per study
    def finished(seed: str) -> list[Dataset]:
        return _unrouted(seed, n=12, rows=256)

    def waiting(seed: str) -> list[Dataset]:
        return make_series(seed, _uid(seed), 1, 12, rows=256)

    caplog.set_level(logging.WARNING, logger="sijnode.daemon.retention")
    with running_node(settings) as node:

        def receive(datasets: list[Dataset], state: StudyState) -> int:
            assert send(datasets, node.scp.port) == [SUCCESS] * len(datasets)
            study_id = _study_id(node, str(datasets[0].StudyInstanceUID))
            wait_for(lambda: _state(node, study_id) is state)
            return study_id

        first = receive(finished("pressure-a"), StudyState.IGNORED)
        second = receive(finished("pressure-b"), StudyState.IGNORED)
        time.sleep(1)  # above the threshold: nothing goes
        assert not _purged_events(node, first) and not _purged_events(node, second)
        kept = receive(waiting("pressure-c"), StudyState.DISPATCHED)
        # below 4 MiB free now: the oldest finished study goes, and that is enough
        wait_for(lambda: _all_removed(node, first), timeout=30)
        time.sleep(1)
        assert {r.removed_reason for r in _instances(node, first)} == {"disk_pressure"}
        assert all(r.removed_at is None for r in _instances(node, second))
        third = receive(finished("pressure-d"), StudyState.IGNORED)
        wait_for(lambda: _all_removed(node, second), timeout=30)
        time.sleep(1)
        assert all(r.removed_at is None for r in _instances(node, third)), "newest kept"
        # only waiting studies and the newest finished one: fill with waiting ones
        receive(waiting("pressure-e"), StudyState.DISPATCHED)
        wait_for(lambda: _all_removed(node, third), timeout=30)
        receive(waiting("pressure-f"), StudyState.DISPATCHED)
        wait_for(
            lambda: (
                node.metrics.registry.get_sample_value("sijnode_spool_pressure_unrelieved") == 1
            ),
            timeout=30,
        )
        assert any("nothing left that may be removed" in r.message for r in caplog.records)
        for row in _instances(node, kept):
            assert row.removed_at is None and node.spool.path(row.spool_path).is_file()
        # the disk fills: new instances are refused with 0xA700, as without retention
        statuses = [
            status
            for seed in ("pressure-g", "pressure-h", "pressure-i")
            for status in send(waiting(seed), node.scp.port)
        ]
        assert SUCCESS in statuses and OUT_OF_RESOURCES in statuses
        with node.sessions() as s:
            removed = s.scalars(select(Instance).where(Instance.removed_at.is_not(None))).all()
            waiting_ids = {j.study_id for j in s.scalars(select(Job))}
        assert {r.study_id for r in removed} == {first, second, third}
        assert not waiting_ids & {r.study_id for r in removed}


def test_resent_removed_study_is_stored_again_and_its_new_job_reads_the_new_files(
    tmp_path: Path, db_url: str
) -> None:
    settings = _fast(tmp_path, db_url, retention="1s", retention_waiting="2s")
    uid = "1.2.826.0.1.3680043.8.498.777001"
    series = make_series("retention-resend", uid, 1, 4, images_in_acquisition=None)
    first = series[:3]
    with running_node(settings) as node:
        assert send(first, node.scp.port) == [SUCCESS] * 3
        study_id = _study_id(node, uid)
        wait_for(lambda: [j.state for j in _jobs(node, study_id)] == [JobState.NO_MODEL])
        # waiting in no_model past storage.retention_waiting: removed
        wait_for(lambda: _all_removed(node, study_id), timeout=30)
        before = {r.sop_instance_uid: r for r in _instances(node, study_id)}
        assert all(not node.spool.path(r.spool_path).exists() for r in before.values())
        # re-sent with one more slice: stored again, not taken for duplicates
        assert send(series, node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: len(_jobs(node, study_id)) == 2, timeout=30)
        old, new = _jobs(node, study_id)
        with node.sessions() as s:
            restored = s.scalars(
                select(Event).where(
                    Event.type == EventType.INSTANCE_RESTORED, Event.study_id == study_id
                )
            ).all()
            duplicates = s.scalars(
                select(Event).where(Event.type == EventType.INSTANCE_DUPLICATE)
            ).all()
        assert len(restored) == 3 and not duplicates
        assert {e.detail["removed_reason"] for e in restored} == {"retention"}
        rows = {r.sop_instance_uid: r for r in _instances(node, study_id)}
        assert len(rows) == 4 and all(r.removed_at is None for r in rows.values())
        assert old.state is JobState.SUPERSEDED and new.study_generation == 2
        assert len(new.spool_paths) == 4
        sent = {str(ds.SOPInstanceUID): ds for ds in series}
        for path in new.spool_paths:
            (row,) = [r for r in rows.values() if r.spool_path == path]
            data = node.spool.path(path).read_bytes()
            assert dataset_part(data) == dataset_part(encode(sent[row.sop_instance_uid]))
        assert {p for p in old.spool_paths} <= set(new.spool_paths)


# --------------------------------------------------------------------- kill -9 mid-sweep


def _serve(tmp_path: Path, port: int, retention: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": f"sqlite:///{tmp_path / 'audit.db'}",
            "SIJNODE_DATABASE__PSEUDONYM_SECRET": "test-secret",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_STORAGE__PURGE_BELOW_FREE_MB": "1",
            "SIJNODE_STORAGE__RETENTION": retention,
            "SIJNODE_STORAGE__SWEEP_INTERVAL_SECONDS": "0.05",
            "SIJNODE_STORAGE__SWEEP_MAX_FILES": "100000",
            "SIJNODE_NODE__PORT": str(port),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_METRICS__PORT": "0",
            "SIJNODE_LOGGING__JSON_FORMAT": "true",
        }
    )
    log = (tmp_path / f"serve-{retention}.log").open("ab")
    proc = subprocess.Popen([SIJNODE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    ae = AE()
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / f"serve-{retention}.log").read_text()
        assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
        if assoc.is_established:
            assoc.release()
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("sijnode serve did not start listening")


def _audit_against_spool(tmp_path: Path) -> tuple[set[int], set[int], set[int]]:
    """(rows marked removed, rows whose file is gone, rows named by pending intents)."""
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    with sessions() as s:
        rows = s.execute(select(Instance.id, Instance.spool_path, Instance.removed_at)).all()
        pending = s.scalars(
            select(SpoolRemoval).where(SpoolRemoval.status == RemovalStatus.PENDING.value)
        ).all()
    spool = tmp_path / "spool"
    marked = {i for i, _, removed in rows if removed is not None}
    gone = {i for i, path, _ in rows if not (spool / path).exists()}
    named = {i for intent in pending for i in intent.instance_ids}
    return marked, gone, named


def test_kill_9_during_a_sweep_leaves_no_unrecorded_removal_and_no_false_record(
    tmp_path: Path,
) -> None:
    settings = node_settings(tmp_path, storage={"retention": "1h"})
    studies = [_unrouted(f"kill9-sweep-{i}", n=80) for i in range(8)]
    with running_node(settings) as node:
        for study in studies:
            assert send(study, node.scp.port) == [SUCCESS] * len(study)
        ids = [_study_id(node, str(study[0].StudyInstanceUID)) for study in studies]
        for study_id in ids:
            wait_for(lambda sid=study_id: _state(node, sid) is StudyState.IGNORED, timeout=60)
    total = sum(len(s) for s in studies)
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    port = free_port()
    killed_mid_unlink = False
    for _ in range(3):  # each round kills the node with a removal pending
        proc = _serve(tmp_path, port, retention="0s")
        try:
            deadline = time.monotonic() + 60
            pending = select(SpoolRemoval.id).where(
                SpoolRemoval.status == RemovalStatus.PENDING.value
            )
            kept = select(Instance.id).where(Instance.removed_at.is_(None))
            while time.monotonic() < deadline:
                with sessions() as s:
                    intent = s.scalars(pending).first()
                    if intent is None:
                        if s.scalars(kept).first() is None:
                            break  # all removed before a pending intent was seen
                        continue
                    named = s.scalars(
                        select(SpoolRemoval.instance_ids).where(SpoolRemoval.id == intent)
                    ).one()
                    first_path = s.scalar(
                        select(Instance.spool_path).where(Instance.id == min(named))
                    )
                # the intent is committed: kill as soon as its unlinks have begun
                first = tmp_path / "spool" / str(first_path)
                until = time.monotonic() + 2
                while first.exists() and time.monotonic() < until:
                    pass
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        marked, gone, named = _audit_against_spool(tmp_path)
        # no record of a removal that did not happen
        assert marked <= gone, f"rows marked removed with their file present: {marked - gone}"
        # no file removed without its record: the row says so, or a pending intent does
        assert gone <= marked | named, f"files gone without a record: {gone - marked - named}"
        killed_mid_unlink |= bool((gone - marked) and (named - gone))
        if len(gone) == total:
            break
    # a restart closes the pending intents from the files still there
    proc = _serve(tmp_path, port, retention="1h")
    try:
        marked, gone, named = _audit_against_spool(tmp_path)
        assert not named, "recovery at start-up closed every pending intent"
        assert marked == gone
        with sessions() as s:
            purged = s.scalars(select(Event).where(Event.type == EventType.SPOOL_PURGED)).all()
            removals = s.scalars(select(SpoolRemoval)).all()
        assert sum(e.detail["instances"] for e in purged) == len(marked)
        assert {r.status for r in removals} <= {RemovalStatus.DONE, RemovalStatus.ROLLED_BACK}
        assert count_rows(sessions) == total, "every instance row stays"
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"removed {len(marked)} of {total}; a kill landed mid-unlink: {killed_mid_unlink}")


def count_rows(sessions: Any) -> int:
    with sessions() as s:
        return len(s.scalars(select(Instance.id)).all())


def test_retention_durations_parse_and_a_bad_one_is_named() -> None:
    from sijnode.errors import ConfigurationError
    from sijnode.settings import load_settings, parse_duration

    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("30s") == 30 and parse_duration("1.5m") == 90
    storage = load_settings(overrides={"storage": {"retention": "2w"}}).storage
    assert storage.retention_seconds == 14 * 86400
    assert storage.retention_waiting_seconds == 30 * 86400  # the default
    with pytest.raises(ConfigurationError, match=r"storage\.retention_waiting.*'30 days'"):
        load_settings(overrides={"storage": {"retention_waiting": "30 days"}})
    # the disk-pressure threshold is never below the refusal threshold
    low = load_settings(overrides={"storage": {"min_free_mb": 10, "purge_below_free_mb": 2}})
    assert low.storage.purge_below_free_bytes == 10 * 2**20
