"""Storage Commitment against a pynetdicom peer that reports a failure first: the
uncommitted object is sent again and commitment asked again; only a report that lists
every object makes the delivery delivered. The peer opens a new association to the
node's commitment listener for each N-EVENT-REPORT, as Orthanc does. A report for an
unknown transaction is refused (0x0110) and recorded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy import select

from sijnode.db.schema import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Event,
    EventType,
    utcnow,
)
from sijnode.delivery.commitment import STATUS_PROCESSING_FAILURE
from sijnode.delivery.objects import COMPREHENSIVE_SR
from sijnode.delivery.scheduler import DeliveryScheduler
from tests.conftest import free_port
from tests.deliveries import delivery_settings, make_results, seed_job, sessions_for

SC = "1.2.840.10008.5.1.4.1.1.7"


@contextmanager
def committing_peer(
    port: int, report_port: int, fail_first: bool
) -> Iterator[dict[str, list[Any]]]:
    """Storage SCP + Storage Commitment SCP. The first report fails the first object
    when ``fail_first``; later reports commit everything that was requested."""
    seen: dict[str, list[Any]] = {"stored": [], "requests": [], "reports": []}

    def report(request: Dataset) -> None:
        refs = list(request.ReferencedSOPSequence)
        ds = Dataset()
        ds.TransactionUID = request.TransactionUID
        failed = refs[:1] if fail_first and not seen["reports"] else []
        ok = [r for r in refs if r not in failed]
        ds.ReferencedSOPSequence = ok
        if failed:
            item = Dataset()
            item.ReferencedSOPClassUID = failed[0].ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = failed[0].ReferencedSOPInstanceUID
            item.FailureReason = 0x0110
            ds.FailedSOPSequence = [item]
        client = AE(ae_title="DEST")
        client.add_requested_context(StorageCommitmentPushModel)
        assoc = client.associate(
            "127.0.0.1",
            report_port,
            ae_title="SIJNODE",
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        )
        if not assoc.is_established:  # nobody takes the report (the timeout test)
            seen["reports"].append((None, []))
            return
        status, _reply = assoc.send_n_event_report(
            ds, 2 if failed else 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        seen["reports"].append((int(status.Status), [r.ReferencedSOPInstanceUID for r in ok]))
        assoc.release()

    def on_store(event: Any) -> int:
        seen["stored"].append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def on_action(event: Any) -> tuple[int, None]:
        request = event.action_information
        seen["requests"].append(request)
        threading.Timer(0.2, report, args=(request,)).start()
        return 0x0000, None

    ae = AE(ae_title="DEST")
    for uid in (SC, COMPREHENSIVE_SR):
        ae.add_supported_context(uid)
    ae.add_supported_context(StorageCommitmentPushModel)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)],
    )
    try:
        yield seen
    finally:
        server.shutdown()


def _wait_status(sessions: Any, *states: DeliveryStatus) -> Delivery:
    deadline = time.monotonic() + 20
    while True:
        with sessions() as s:
            d = s.scalars(select(Delivery)).one()
        if d.status in states:
            return d
        assert time.monotonic() < deadline, (d.status, d.last_error)
        time.sleep(0.05)


def test_only_a_report_of_every_object_commits(tmp_path: Path) -> None:
    port, report_port = free_port(), free_port()
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": port,
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_port": report_port},
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    assert scheduler.listener is not None
    scheduler.listener.start()
    try:
        with committing_peer(port, report_port, fail_first=True) as seen:
            t0 = utcnow()
            scheduler.enqueue(job_id, now=t0)
            scheduler.run_due(t0)
            d = _wait_status(sessions, DeliveryStatus.RETRYING)  # the report failed one
            assert "did not commit 1 of 3" in (d.last_error or "")
            first = results.sop_instance_uids[0]
            assert first not in (d.sop_instance_uids or [])
            scheduler.run_due(t0 + timedelta(minutes=5))
            d = _wait_status(sessions, DeliveryStatus.DELIVERED)
    finally:
        scheduler.listener.stop()
    # the failed object was stored again, the others only once
    assert sorted(seen["stored"]) == sorted([*results.sop_instance_uids, first])
    # both commitment requests named every object of the delivery
    for request in seen["requests"]:
        refs = {str(r.ReferencedSOPInstanceUID) for r in request.ReferencedSOPSequence}
        assert refs == set(results.sop_instance_uids)
    assert [status for status, _ in seen["reports"]] == [0, 0]
    assert d.committed_at is not None and d.attempts == 2
    with sessions() as s:
        outcomes = [
            a.outcome for a in s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id))
        ]
    assert outcomes == ["committing", "transient", "committing", "committed"]


def test_no_report_in_time_asks_again(tmp_path: Path) -> None:
    port = free_port()
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": port,
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_timeout_seconds": 60},
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    # the reports go to a port where nothing listens: they never arrive
    with committing_peer(port, free_port(), fail_first=False) as seen:
        t0 = utcnow()
        scheduler.enqueue(job_id, now=t0)
        scheduler.run_due(t0)
        with sessions() as s:
            assert s.scalars(select(Delivery)).one().status is DeliveryStatus.COMMITTING
        assert scheduler.run_due(t0 + timedelta(seconds=30)) == []  # still waiting
        scheduler.run_due(t0 + timedelta(seconds=61))  # timed out: retrying
        with sessions() as s:
            d = s.scalars(select(Delivery)).one()
        assert d.status is DeliveryStatus.RETRYING
        assert "no Storage Commitment report within 60 s" in (d.last_error or "")
        scheduler.run_due(t0 + timedelta(minutes=10))  # asks again, sends nothing new
        time.sleep(0.5)
    assert len(seen["requests"]) == 2
    assert [status for status, _ in seen["reports"]] == [None, None]
    assert sorted(seen["stored"]) == sorted(results.sop_instance_uids)  # stored once


def test_the_commitment_listener_takes_only_the_destinations(tmp_path: Path) -> None:
    report_port = free_port()
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": free_port(),
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_port": report_port},
    )
    scheduler = DeliveryScheduler(settings, sessions_for(settings))
    assert scheduler.listener is not None
    scheduler.listener.start()
    try:
        outcomes = {}
        for calling in ("INTRUDER", "DEST"):
            client = AE(ae_title=calling)
            client.add_requested_context(StorageCommitmentPushModel)
            assoc = client.associate("127.0.0.1", report_port, ae_title="SIJNODE")
            outcomes[calling] = assoc.is_established
            if assoc.is_established:
                assoc.release()
    finally:
        scheduler.listener.stop()
    assert outcomes == {"INTRUDER": False, "DEST": True}


def test_a_report_for_an_unknown_transaction_is_refused_and_recorded(tmp_path: Path) -> None:
    """An N-EVENT-REPORT naming a transaction no delivery awaits: answered 0x0110 (the peer
    sends it again) and recorded as a ``commitment_unknown`` event with who sent it."""
    report_port = free_port()
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": free_port(),
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_port": report_port},
    )
    sessions = sessions_for(settings)
    scheduler = DeliveryScheduler(settings, sessions)
    assert scheduler.listener is not None
    scheduler.listener.start()
    ds = Dataset()
    ds.TransactionUID = "2.25.1234567890"
    item = Dataset()
    item.ReferencedSOPClassUID = SC
    item.ReferencedSOPInstanceUID = "2.25.42"
    ds.ReferencedSOPSequence = [item]
    try:
        client = AE(ae_title="DEST")
        client.add_requested_context(StorageCommitmentPushModel)
        assoc = client.associate(
            "127.0.0.1",
            report_port,
            ae_title="SIJNODE",
            ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
        )
        assert assoc.is_established
        status, _reply = assoc.send_n_event_report(
            ds, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )
        assoc.release()
    finally:
        scheduler.listener.stop()
    assert int(status.Status) == STATUS_PROCESSING_FAILURE == 0x0110
    with sessions() as s:
        (event,) = s.scalars(select(Event).where(Event.type == EventType.COMMITMENT_UNKNOWN))
    assert event.detail["transaction_uid"] == "2.25.1234567890"
    assert event.detail["reason"] == "no delivery awaits this transaction"
    assert event.detail["committed"] == 1 and event.detail["failed"] == 0
    assert event.detail["calling_ae_title"] == "DEST"
    assert event.detail["peer_address"] == "127.0.0.1"
    assert event.job_id is None
