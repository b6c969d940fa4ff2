"""Delivery over DICOM to real peers: DCMTK storescp, and pynetdicom SCPs that accept only
some classes or answer with a given status. The schedule is driven with an explicit
clock (``run_due(now)``), so retries are tested without waiting for the backoff."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from sijnode.db.lifecycle import transition
from sijnode.db.schema import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    EventType,
    Job,
    JobState,
    utcnow,
)
from sijnode.delivery.objects import COMPREHENSIVE_SR, ENHANCED_SR, SR_CLASSES, from_file
from sijnode.delivery.scheduler import DeliveryScheduler, backoff_delay
from sijnode.delivery.scu import set_tcp_nodelay
from sijnode.errors import ConfigurationError
from sijnode.settings import load_settings
from tests.conftest import free_port, require_tool
from tests.deliveries import (
    delivery_settings,
    make_results,
    pynetdicom_scp,
    received,
    seed_job,
    sessions_for,
    storescp,
)

SC = "1.2.840.10008.5.1.4.1.1.7"
SIJNODE = Path(sys.executable).with_name("sijnode")


def _dest(port: int, **extra: object) -> dict[str, object]:
    return {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port, **extra}


def _delivery(sessions, job_id: int) -> Delivery:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalars(select(Delivery).where(Delivery.job_id == job_id)).one()


def _job_state(sessions, job_id: int) -> JobState:  # type: ignore[no-untyped-def]
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.state


def test_storescp_receives_every_object_and_the_job_is_delivered(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    with storescp(port, tmp_path / "recv") as out:
        scheduler.enqueue(job_id)
        assert scheduler.run_due() != []
        got = received(out)
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(results.sop_instance_uids)
    assert sorted(str(ds.SOPClassUID) for ds in got) == [SC, SC, COMPREHENSIVE_SR]
    sr = next(ds for ds in got if ds.SOPClassUID == COMPREHENSIVE_SR)
    assert sr.StudyInstanceUID == results.study_instance_uid
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DELIVERED and d.attempts == 1
    assert sorted(d.sop_instance_uids or []) == sorted(results.sop_instance_uids)
    assert d.kind == "dicom" and d.delivered_at is not None
    assert _job_state(sessions, job_id) is JobState.DELIVERED
    with sessions() as s:
        attempts = s.scalars(select(DeliveryAttempt)).all()
        events = s.scalars(select(Event).where(Event.type == EventType.DELIVERY_ATTEMPT)).all()
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "delivered")]
    assert sorted(attempts[0].sop_instance_uids) == sorted(results.sop_instance_uids)
    assert events[-1].detail["status"] == "delivered"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in scheduler.metrics.registry.collect()
        for s in metric.samples
    }
    assert (
        samples[("sijnode_delivery_attempts_total", (("kind", "dicom"), ("outcome", "delivered")))]
        == 1
    )
    assert samples[("sijnode_delivery_seconds_count", (("kind", "dicom"),))] == 1


def test_destination_down_then_up_is_delivered_once(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    scheduler.enqueue(job_id, now=t0)
    assert scheduler.run_due(t0) != []  # refused: nothing listens
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.RETRYING and d.attempts == 1
    assert "could not connect" in (d.last_error or "")
    assert d.next_attempt_at is not None
    assert abs((d.next_attempt_at.replace(tzinfo=t0.tzinfo) - t0) - timedelta(seconds=5)) < (
        timedelta(seconds=1)
    )
    assert scheduler.run_due(t0 + timedelta(seconds=2)) == []  # not due yet
    assert scheduler.run_due(t0 + timedelta(seconds=6)) != []  # still down: 2nd failure
    d = _delivery(sessions, job_id)
    assert d.attempts == 2 and d.status is DeliveryStatus.RETRYING
    assert d.next_attempt_at is not None  # backoff doubled: 10 s after the 2nd try
    later = t0 + timedelta(seconds=6) + backoff_delay(settings, 2)
    with storescp(port, tmp_path / "recv") as out:
        assert scheduler.run_due(later) != []
        assert scheduler.run_due(later + timedelta(hours=1)) == []  # delivered: never again
        files = received(out)
    assert len(files) == len(results.files)  # no duplicate objects at the destination
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DELIVERED and d.attempts == 3
    assert _job_state(sessions, job_id) is JobState.DELIVERED


def test_a_pending_retry_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    first = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, first, results)
    scheduler = DeliveryScheduler(settings, first)
    t0 = utcnow()
    scheduler.enqueue(job_id, now=t0)
    scheduler.run_due(t0)
    assert _delivery(first, job_id).status is DeliveryStatus.RETRYING
    del scheduler
    first.kw["bind"].dispose()
    # a new process: new engine, new scheduler, nothing carried over in memory
    again = sessions_for(settings)
    restarted = DeliveryScheduler(settings, again)
    assert restarted.due(t0 + timedelta(seconds=1)) == []
    with storescp(port, tmp_path / "recv") as out:
        assert restarted.run_due(t0 + timedelta(seconds=6)) != []
        files = received(out)
    assert len(files) == len(results.files)
    assert _delivery(again, job_id).status is DeliveryStatus.DELIVERED


def test_a_destination_with_only_enhanced_sr_gets_enhanced_sr(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    with pynetdicom_scp(port, [SC, ENHANCED_SR]) as got:
        scheduler.enqueue(job_id)
        scheduler.run_due()
    classes = sorted(str(ds.SOPClassUID) for ds in got)
    assert classes == [SC, SC, ENHANCED_SR]
    sr = next(ds for ds in got if ds.SOPClassUID == ENHANCED_SR)
    assert str(sr.SOPInstanceUID) == results.sop_instance_uids[-1]  # same UID, other class
    assert _delivery(sessions, job_id).status is DeliveryStatus.DELIVERED


def test_a_destination_that_takes_no_sr_class_is_a_permanent_failure(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    with pynetdicom_scp(port, [SC]) as got:
        scheduler.enqueue(job_id, now=t0)
        scheduler.run_due(t0)
        scheduler.run_due(t0 + timedelta(hours=1))
    assert len(got) == 2  # the captures went; the SR had no accepted class
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD and d.attempts == 1
    assert "accepted none of" in (d.last_error or "")
    assert _job_state(sessions, job_id) is JobState.REPORTED


@pytest.mark.parametrize("status", [0xA900, 0xC000])
def test_a_permanent_rejection_is_not_retried(tmp_path: Path, status: int) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    sr_status = lambda ds: status if "88." in str(ds.SOPClassUID) else 0  # noqa: E731
    with pynetdicom_scp(port, [SC, COMPREHENSIVE_SR], status=sr_status) as got:
        scheduler.enqueue(job_id, now=t0)
        scheduler.run_due(t0)
        for hours in (1, 2, 3):
            assert scheduler.run_due(t0 + timedelta(hours=hours)) == []
    assert len(got) == 3  # tried once each, never again
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD and d.attempts == 1
    assert d.last_status == status and f"0x{status:04X}" in (d.last_error or "")


def test_a_transient_status_is_retried_and_then_dead_lettered(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    with pynetdicom_scp(port, [SC, COMPREHENSIVE_SR], status=lambda _ds: 0xA700) as got:
        scheduler.enqueue(job_id, now=t0)
        for hours in range(5):
            scheduler.run_due(t0 + timedelta(hours=hours))
    assert len(got) == 3  # max_attempts = 3, stops at the first refusal each time
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD and d.attempts == 3
    assert "gave up after 3 attempts" in (d.last_error or "")
    with sessions() as s:
        outcomes = [
            a.outcome for a in s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id))
        ]
    assert outcomes == ["transient"] * 3


def test_dead_letter_is_re_sent_with_the_cli(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)], delivery={"max_attempts": 1})
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIJNODE_")},
        "SIJNODE_DATABASE__URL": settings.database.url,
        "SIJNODE_DATA_DIR": str(tmp_path),
        "SIJNODE_DESTINATIONS": json.dumps([_dest(port)]),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SIJNODE), *args], env=env, capture_output=True, text=True, timeout=120
        )

    listed = cli("deliveries", "list", "--state", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["state"]) for r in rows] == [(d.id, "dead")]
    assert "could not connect" in rows[0]["last_error"]
    with storescp(port, tmp_path / "recv") as out:
        done = cli("deliveries", "retry", "--all-dead", "--send")
        assert done.returncode == 0, done.stderr
        assert f"delivery {d.id}: delivered" in done.stdout
        assert len(received(out)) == len(results.files)
    assert _delivery(sessions, job_id).status is DeliveryStatus.DELIVERED
    assert cli("deliveries", "list", "--state", "dead").stdout.strip() == "no deliveries"
    bad = cli("deliveries", "retry", "999")
    assert bad.returncode == 1 and "unknown [999]" in bad.stderr
    with sessions() as s:
        requeued = s.scalars(select(Event).where(Event.type == EventType.DELIVERY_REQUEUED)).all()
    assert [e.detail["previous"] for e in requeued] == ["dead"]


def test_retry_by_id_requeues_for_the_loop(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)], delivery={"max_attempts": 1})
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    d = _delivery(sessions, job_id)
    from sijnode.db.engine import transaction
    from sijnode.delivery.scheduler import requeue

    with transaction(sessions) as s:
        requeue(s, [d.id])
    assert _delivery(sessions, job_id).status is DeliveryStatus.PENDING
    with storescp(port, tmp_path / "recv") as out:
        scheduler.start()
        try:
            scheduler.wake()
            deadline = utcnow() + timedelta(seconds=20)
            while _delivery(sessions, job_id).status is not DeliveryStatus.DELIVERED:
                assert utcnow() < deadline, "the loop thread did not deliver"
                import time

                time.sleep(0.1)
        finally:
            scheduler.stop()
        assert len(received(out)) == len(results.files)


@pytest.mark.parametrize("where", ["global", "route", "job"])
def test_shadow_mode_sends_nothing_and_records_everything(tmp_path: Path, where: str) -> None:
    port = free_port()
    overrides: dict[str, object] = {"destinations": [_dest(port)]}
    if where == "global":
        overrides["delivery"] = {"shadow_mode": True}
    if where == "route":
        overrides["routes"] = [
            {"name": "mr-sij", "pipeline": "mr", "modality": "MR", "shadow_mode": True}
        ]
    settings = delivery_settings(tmp_path, **overrides)
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results, shadow=where == "job")
    scheduler = DeliveryScheduler(settings, sessions)
    with storescp(port, tmp_path / "recv") as out:
        scheduler.enqueue(job_id)
        assert scheduler.run_due(utcnow() + timedelta(days=1)) == []
        assert received(out) == []
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.SHADOW and d.attempts == 0
    assert _job_state(sessions, job_id) is JobState.SHADOW
    with sessions() as s:
        attempt = s.scalars(select(DeliveryAttempt)).one()
        states = [t.state for t in s.get(Job, job_id).transitions]  # type: ignore[union-attr]
    assert attempt.outcome == "shadow"
    assert sorted(attempt.sop_instance_uids) == sorted(results.sop_instance_uids)
    assert states[-2:] == [JobState.REPORTED, JobState.SHADOW]


def test_route_destinations_choose_the_peers(tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    settings = delivery_settings(
        tmp_path,
        destinations=[_dest(a), {**_dest(b), "name": "archive"}],
        routes=[
            {"name": "mr-sij", "pipeline": "mr", "modality": "MR", "destinations": ["archive"]}
        ],
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    with storescp(a, tmp_path / "a") as out_a, storescp(b, tmp_path / "b") as out_b:
        scheduler.enqueue(job_id)
        scheduler.run_due()
        assert received(out_a) == []
        assert len(received(out_b)) == len(results.files)
    with sessions() as s:
        names = [d.destination for d in s.scalars(select(Delivery))]
    assert names == ["archive"]


def test_settings_name_only_known_destinations() -> None:
    with pytest.raises(ConfigurationError, match=r"routes.0.destinations.*expected names from"):
        load_settings(
            overrides={
                "routes": [{"name": "r", "pipeline": "mr", "modality": "MR", "destinations": ["x"]}]
            }
        )
    with pytest.raises(ConfigurationError, match="Field required for a dicom destination"):
        load_settings(overrides={"destinations": [{"name": "p"}]})
    with pytest.raises(ConfigurationError, match="url for a stow destination"):
        load_settings(overrides={"destinations": [{"name": "p", "kind": "stow"}]})
    with pytest.raises(ConfigurationError, match="name of the triage notification"):
        load_settings(
            overrides={"destinations": [{"name": "webhook", "ae_title": "A", "host": "h"}]}
        )
    with pytest.raises(ConfigurationError, match="unique names"):
        load_settings(
            overrides={
                "destinations": [
                    {"name": "p", "ae_title": "A", "host": "h"},
                    {"name": "p", "ae_title": "B", "host": "h"},
                ]
            }
        )


def test_tcp_nodelay_is_set_on_the_sending_socket() -> None:
    port = free_port()
    seen: list[int] = []

    def check(event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server_ae = AE(ae_title="DEST")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(("127.0.0.1", port), block=False)
    try:
        ae = AE(ae_title="SIJNODE")
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1",
            port,
            ae_title="DEST",
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, check)],
        )
        assert assoc.is_established
        assoc.release()
    finally:
        server.shutdown()
    assert seen and seen[0] != 0


def test_a_host_that_does_not_resolve_is_retried(tmp_path: Path) -> None:
    dest = {**_dest(104), "host": "no-such-host.invalid"}
    settings = delivery_settings(tmp_path, destinations=[dest])
    sessions = sessions_for(settings)
    job_id = seed_job(settings, sessions, make_results(tmp_path / "out"))
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.RETRYING and d.attempts == 1
    assert d.last_error


def test_an_output_file_that_is_gone_is_a_recorded_permanent_failure(tmp_path: Path) -> None:
    settings = delivery_settings(tmp_path, destinations=[_dest(free_port())])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    results.files[0].unlink()
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD
    assert "expected a readable DICOM file" in (d.last_error or "")


@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_the_sr_in_each_proposed_class_is_validator_clean(tmp_path: Path, sop_class: str) -> None:
    """What the default re-encoder sends passes dciodvfy (0 errors, 0 warnings) and
    dsrdump parses it; the content is unchanged."""
    results = make_results(tmp_path / "out")
    obj = from_file(results.files[-1])
    ds = obj.build(sop_class)
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    check = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (check.stdout + check.stderr).splitlines()
        if line.startswith(("Error", "Warning"))
    ]
    assert problems == []
    dump = subprocess.run(
        [require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0 and "Probability" in dump.stdout
    back = dcmread(path)
    assert back.SOPClassUID == sop_class and back.file_meta.MediaStorageSOPClassUID == sop_class
    original = dcmread(results.files[-1])
    assert back.ContentSequence == original.ContentSequence
    assert back.SOPInstanceUID == original.SOPInstanceUID


def test_a_superseded_job_is_not_sent(tmp_path: Path) -> None:
    from sijnode.db.engine import transaction

    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)])
    sessions = sessions_for(settings)
    job_id = seed_job(settings, sessions, make_results(tmp_path / "out"))
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    with transaction(sessions) as s:
        job = s.get(Job, job_id)
        assert job is not None
        transition(s, job, JobState.SUPERSEDED, "late images")
    with storescp(port, tmp_path / "recv") as out:
        scheduler.run_due()
        assert received(out) == []
    d = _delivery(sessions, job_id)
    assert d.status is DeliveryStatus.DEAD and "superseded" in (d.last_error or "")


def test_a_dimse_timeout_is_retried_and_only_the_rest_is_sent(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[{**_dest(port), "timeout_seconds": 1}])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    slow = {"left": 1}

    def status(ds: object) -> int:
        if "88." in str(getattr(ds, "SOPClassUID", "")) and slow["left"]:
            slow["left"] -= 1
            time.sleep(2.5)  # longer than the SCU's DIMSE timeout
        return 0

    t0 = utcnow()
    with pynetdicom_scp(port, [SC, COMPREHENSIVE_SR], status=status) as got:
        scheduler.enqueue(job_id, now=t0)
        scheduler.run_due(t0)
        d = _delivery(sessions, job_id)
        assert d.status is DeliveryStatus.RETRYING, d.last_error
        assert "no C-STORE response" in (d.last_error or "")
        assert len(d.sop_instance_uids or []) == 2  # the captures were acknowledged
        time.sleep(2)
        scheduler.run_due(t0 + timedelta(minutes=1))
        sent = [str(ds.SOPInstanceUID) for ds in got]
    assert _delivery(sessions, job_id).status is DeliveryStatus.DELIVERED
    sr_uid = results.sop_instance_uids[-1]
    assert sorted(sent) == sorted([*results.sop_instance_uids, sr_uid])  # only the SR again


def test_jpeg_ls_captures_go_compressed_where_accepted_and_decompressed_elsewhere(
    tmp_path: Path,
) -> None:
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

    results = make_results(tmp_path / "out")
    original = {}
    for path in results.files[:-1]:  # the captures
        ds = dcmread(path)
        original[str(ds.SOPInstanceUID)] = ds.pixel_array.copy()
        ds.compress(JPEGLSLossless, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    plain, jls = free_port(), free_port()
    settings = delivery_settings(
        tmp_path, destinations=[_dest(plain), {**_dest(jls), "name": "jls"}]
    )
    sessions = sessions_for(settings)
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)

    from pynetdicom import AE as PeerAE

    got: list[object] = []
    peer = PeerAE(ae_title="DEST")
    peer.add_supported_context(SC, [JPEGLSLossless, ExplicitVRLittleEndian])
    peer.add_supported_context(COMPREHENSIVE_SR)

    def on_store(event: object) -> int:
        got.append(event.dataset)  # type: ignore[attr-defined]
        got[-1].file_meta = event.file_meta  # type: ignore[attr-defined]
        return 0

    server = peer.start_server(
        ("127.0.0.1", jls), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        with storescp(plain, tmp_path / "recv") as out:
            scheduler.enqueue(job_id)
            scheduler.run_due()
            files = received(out)
    finally:
        server.shutdown()
    with sessions() as s:
        assert {d.status for d in s.scalars(select(Delivery))} == {DeliveryStatus.DELIVERED}
    stored = [ds for ds in files if ds.SOPClassUID == SC]
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in stored} == {ExplicitVRLittleEndian}
    for ds in stored:  # lossless: the same pixels
        assert np.array_equal(ds.pixel_array, original[str(ds.SOPInstanceUID)])
    compressed = [ds for ds in got if ds.SOPClassUID == SC]  # type: ignore[attr-defined]
    assert len(compressed) == 2
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in compressed} == {JPEGLSLossless}  # type: ignore[attr-defined]


def test_two_senders_never_send_one_delivery_twice(tmp_path: Path, db_url: str) -> None:
    """The node's loop and `deliveries retry --send` at the same moment: one claims the
    delivery, the other leaves it (SQLite and PostgreSQL)."""
    import threading

    from sijnode.errors import AuditError

    port = free_port()
    settings = delivery_settings(tmp_path, destinations=[_dest(port)], database={"url": db_url})
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    DeliveryScheduler(settings, sessions).enqueue(job_id)
    d = _delivery(sessions, job_id)
    schedulers = [DeliveryScheduler(settings, sessions_for(settings)) for _ in range(2)]
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def run(scheduler: DeliveryScheduler) -> None:
        barrier.wait()
        try:
            outcomes.append(scheduler.attempt(d.id))
        except AuditError as exc:  # SQLite: the loser's write may find the row locked
            outcomes.append(exc)

    def slow(_ds: object) -> int:
        time.sleep(0.2)
        return 0

    with pynetdicom_scp(port, [SC, COMPREHENSIVE_SR], status=slow) as got:
        threads = [threading.Thread(target=run, args=(s,)) for s in schedulers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    sent = sorted(str(ds.SOPInstanceUID) for ds in got)
    assert sent == sorted(results.sop_instance_uids)  # each object once
    assert sum(1 for o in outcomes if o is not None and not isinstance(o, Exception)) == 1
    after = _delivery(sessions, job_id)
    assert after.status is DeliveryStatus.DELIVERED and after.attempts == 1
