"""The listener with real peers on loopback: echo, assembly, allow-lists, disk, duplicates."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select, text

from sijnode.daemon.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from sijnode.db.schema import (
    Association,
    AssociationOutcome,
    Event,
    EventType,
    Instance,
    Job,
    JobState,
    Study,
    StudyState,
)
from tests.conftest import require_tool
from tests.nodes import (  # noqa: F401 - receive_mode: a fixture
    count,
    current_receive_mode,
    node_settings,
    receive_mode,
    running_node,
    send,
    wait_for,
)
from tests.studies import (
    PRIVATE_NON_IMAGE,
    dataset_part,
    encode,
    make_series,
    make_study,
    private_non_image,
    write,
)

# every test here runs in both receive modes (node.receive_mode)
pytestmark = pytest.mark.usefixtures("receive_mode")


def _study_state(node, uid: str) -> StudyState | None:
    with node.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).first()
        return study.state if study else None


def _jobs(node) -> list[Job]:
    with node.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)).all())


def test_c_echo_with_dcmtk(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        proc = subprocess.run(
            [echoscu, "-aec", "SIJNODE", "127.0.0.1", str(node.scp.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 0, proc.stderr


def test_two_series_over_several_associations_dispatched_once(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    study = make_study("two-series", series=2, n=5)
    uid = str(study[0].StudyInstanceUID)
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        # series 1 with DCMTK, series 2 split over two pynetdicom associations
        files = write(study[:5], tmp_path / "s1")
        proc = subprocess.run(
            [storescu, "-aet", "DCMTK", "-aec", "SIJNODE", "127.0.0.1", str(node.scp.port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert send(study[5:7], node.scp.port) == [SUCCESS, SUCCESS]
        assert send(study[7:], node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: _study_state(node, uid) == StudyState.DISPATCHED)
        wait_for(lambda: all(j.state == JobState.NO_MODEL for j in _jobs(node)))
        assert count(node, Study) == 1
        assert count(node, Instance) == 10
        jobs = _jobs(node)
        assert len(jobs) == 1
        # the CT route picks one of the two series (the pipeline reads one series)
        assert len(jobs[0].spool_paths) == 5
        assert jobs[0].pipeline == "ct"
        with node.sessions() as s:
            reason = s.scalars(select(Study.completion_reason)).one()
        assert reason == "content"  # ImagesInAcquisition was met before the quiet timer
        # the bytes in the spool are the bytes sent
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
            by_uid = {r.sop_instance_uid: r.spool_path for r in rows}
        for ds in study[5:]:
            spooled = node.spool.read(by_uid[str(ds.SOPInstanceUID)])
            assert dataset_part(spooled) == dataset_part(encode(ds))


def test_unrouted_study_is_ignored_with_reason(tmp_path: Path) -> None:
    study = make_study("no-route", n=3)
    for ds in study:
        ds.Modality = "OT"
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3
        uid = str(study[0].StudyInstanceUID)
        wait_for(lambda: _study_state(node, uid) == StudyState.IGNORED)
        with node.sessions() as s:
            reason = s.scalars(select(Study.ignored_reason)).one()
        assert "modality OT is not CT" in reason
        assert _jobs(node) == []


def test_calling_ae_title_not_allowed_is_rejected(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"allowed_calling_ae_titles": ["PACS"]})
    with running_node(settings) as node:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        wait_for(lambda: count(node, Association, Association.outcome == "released") == 1)
        with node.sessions() as s:
            rejected = s.scalars(
                select(Association).where(Association.outcome == AssociationOutcome.REJECTED)
            ).one()
        assert rejected.calling_ae_title == "INTRUDER"
        assert rejected.reject_reason == "calling AE title not allowed"


def test_source_address_not_allowed_is_rejected(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"allowed_addresses": ["10.0.0.0/8"]})
    with running_node(settings) as node:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x01)
        assert count(node, Event, Event.type == EventType.ASSOCIATION_REJECTED) == 1
    allowed = node_settings(tmp_path / "ok", node={"allowed_addresses": ["127.0.0.0/8"]})
    with running_node(allowed) as node:
        assert send(make_study("addr-ok", n=1), node.scp.port) == [SUCCESS]


def test_minimum_free_space_refuses_without_partial_files(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, storage={"min_free_mb": 10**9})
    with running_node(settings) as node:
        statuses = send(make_study("disk-full", n=3), node.scp.port)
        assert statuses == [OUT_OF_RESOURCES] * 3
        assert node.spool.iter_files() == []
        assert list((tmp_path / "spool" / ".tmp").iterdir()) == []
        assert count(node, Instance) == 0
        assert count(node, Event, Event.type == EventType.INSTANCE_REFUSED) == 3
        # the node is still up
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.send_c_echo().Status == 0
        assoc.release()


@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    """A real 1 MiB tmpfs, so writes hit ENOSPC (needs root, as in CI)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {proc.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _send_until_aborted(datasets: list, port: int) -> list[int]:
    """The status of each C-STORE, until the peer aborts the association."""
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    assert assoc.is_established
    statuses = []
    for ds in datasets:
        if not assoc.is_established:
            break
        rsp = assoc.send_c_store(ds)
        if "Status" not in rsp:
            break
        statuses.append(int(rsp.Status))
    if assoc.is_established:
        assoc.release()
    return statuses


def test_full_filesystem_gives_failure_status_and_no_partial_files(
    tmp_path: Path, tiny_filesystem: Path
) -> None:
    """Fast mode answers 0xA700 and keeps the association; in standard mode pynetdicom's
    own file write fails and pynetdicom aborts the association. In both, every
    acknowledged instance is complete, and no partial file survives (fast: at once;
    standard: pynetdicom leaves it, start-up removes it)."""
    settings = node_settings(
        tmp_path, storage={"spool_dir": str(tiny_filesystem / "spool"), "min_free_mb": 0}
    )
    # 256×256 int16 ≈ 128 KiB per slice: the 1 MiB filesystem fills after a few
    study = make_series("enospc", "1.2.3.4", 1, 12, rows=256)
    tmp = tiny_filesystem / "spool" / ".tmp"
    with running_node(settings) as node:
        statuses = _send_until_aborted(study, node.scp.port)
        assert SUCCESS in statuses
        if current_receive_mode() == "fast":
            assert OUT_OF_RESOURCES in statuses and len(statuses) == len(study)
            assert list(tmp.iterdir()) == []
        else:
            assert len(statuses) < len(study)  # aborted by pynetdicom
        stored = statuses.count(SUCCESS)
        assert count(node, Instance) == stored
        assert len(node.spool.iter_files()) == stored
        # every acknowledged instance is complete and byte-identical
        with node.sessions() as s:
            for row in s.scalars(select(Instance)).all():
                ds = next(d for d in study if str(d.SOPInstanceUID) == row.sop_instance_uid)
                assert dataset_part(node.spool.read(row.spool_path)) == dataset_part(encode(ds))
        # the node is still up
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    with running_node(settings, migrate=False) as node:
        assert list(tmp.iterdir()) == []
        assert count(node, Instance) == stored


def test_invalid_uid_is_refused_and_node_stays_up(tmp_path: Path) -> None:
    study = make_study("bad-uid", n=2)
    study[0].SOPInstanceUID = "1.2.03.abc"
    with running_node(node_settings(tmp_path)) as node:
        assert send(study, node.scp.port) == [CANNOT_UNDERSTAND, SUCCESS]
        assert count(node, Instance) == 1
        paths = node.spool.iter_files()
        assert len(paths) == 1 and "abc" not in paths[0]


def test_duplicate_resend_creates_no_second_job(tmp_path: Path) -> None:
    study = make_study("dup", n=4)
    uid = str(study[0].StudyInstanceUID)
    with running_node(node_settings(tmp_path)) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: _study_state(node, uid) == StudyState.DISPATCHED)
        assert send(study, node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: count(node, Event, Event.type == EventType.JOB_DUPLICATE) == 1)
        assert count(node, Instance) == 4
        assert count(node, Event, Event.type == EventType.INSTANCE_DUPLICATE) == 4
        assert len(_jobs(node)) == 1
        assert _study_state(node, uid) == StudyState.DISPATCHED


def test_same_uid_different_bytes_keeps_both(tmp_path: Path) -> None:
    study = make_study("conflict", n=2)
    other = make_study("conflict", n=2)
    other[0].SeriesDescription = "changed"
    with running_node(node_settings(tmp_path)) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 2
        assert send(other[:1], node.scp.port) == [SUCCESS]
        uid = str(study[0].SOPInstanceUID)
        with node.sessions() as s:
            rows = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).all()
        assert len(rows) == 2 and all(r.conflict for r in rows)
        assert {dataset_part(node.spool.read(r.spool_path)) for r in rows} == {
            dataset_part(encode(study[0])),
            dataset_part(encode(other[0])),
        }
        assert count(node, Event, Event.type == EventType.INSTANCE_CONFLICT) == 1


def test_late_instances_reopen_and_supersede(tmp_path: Path) -> None:
    study_uid = "1.2.826.0.1.3680043.8.498.999"
    series = make_series("late", study_uid, 1, 6, images_in_acquisition=None)
    with running_node(node_settings(tmp_path)) as node:
        assert send(series[:4], node.scp.port) == [SUCCESS] * 4
        wait_for(lambda: _study_state(node, study_uid) == StudyState.DISPATCHED)
        first = _jobs(node)[0]
        assert len(first.spool_paths) == 4
        assert send(series[4:], node.scp.port) == [SUCCESS] * 2
        wait_for(lambda: len(_jobs(node)) == 2)
        wait_for(lambda: _study_state(node, study_uid) == StudyState.DISPATCHED)
        old, new = _jobs(node)
        assert old.state == JobState.SUPERSEDED and old.superseded_by_id == new.id
        assert len(new.spool_paths) == 6 and new.study_generation == 2
        assert count(node, Event, Event.type == EventType.STUDY_REOPENED) == 1


def test_database_that_cannot_be_written_refuses_instances(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        engine = node.sessions.kw["bind"]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TRIGGER fail_insert BEFORE INSERT ON instances "
                    "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
                )
            )
        statuses = send(make_study("db-down", n=2), node.scp.port)
        assert statuses == [OUT_OF_RESOURCES] * 2
        assert node.spool.iter_files() == []
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER fail_insert"))
        assert send(make_study("db-up", n=1), node.scp.port) == [SUCCESS]


def test_per_association_limit(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"max_instances_per_association": 2})
    with running_node(settings) as node:
        assert send(make_study("limit", n=3), node.scp.port) == [SUCCESS, SUCCESS, OUT_OF_RESOURCES]


@pytest.mark.parametrize("allowed", [False, True])
def test_reidentification_map_only_when_allowed(tmp_path: Path, allowed: bool) -> None:
    from sijnode.db.pseudonyms import patient_pseudonym
    from sijnode.db.reid import reidentify
    from sijnode.db.schema import Reidentification
    from tests.studies import PATIENT_ID

    settings = node_settings(tmp_path, database={"allow_reidentification": allowed})
    with running_node(settings) as node:
        assert send(make_study("reid", n=2), node.scp.port) == [SUCCESS] * 2
        with node.sessions() as s:
            study = s.scalars(select(Study)).one()
            assert study.patient_pseudonym == patient_pseudonym(PATIENT_ID, "test-secret")
            rows = s.scalars(select(Reidentification)).all()
            if allowed:
                assert len(rows) == 2  # patient and accession, once per study
                assert reidentify(s, study.patient_pseudonym) == ("patient", PATIENT_ID)
            else:
                assert rows == []


# -- issue 9: receiving, hardened --------------------------------------------------------


def test_size_bytes_is_the_stored_size_also_for_one_pdu_data_sets(tmp_path: Path) -> None:
    """Small data sets arrive in one PDU; their row records their real size."""
    study = make_study("sizes", n=3)  # 32×32 int16: about 3 KB each, one PDU
    big = make_series("sizes-big", str(study[0].StudyInstanceUID), 2, 1, rows=256)
    with running_node(node_settings(tmp_path)) as node:
        assert send(study + big, node.scp.port) == [SUCCESS] * 4
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
        assert len(rows) == 4
        for row in rows:
            assert row.size_bytes == node.spool.path(row.spool_path).stat().st_size > 0

        def association_bytes() -> int | None:
            with node.sessions() as s:
                return s.scalars(select(Association.bytes_received)).one()

        # the association's row is closed with its counts once it is released
        wait_for(lambda: association_bytes() == sum(r.size_bytes for r in rows))


def test_deflated_full_size_ct_slice_from_storescu(tmp_path: Path) -> None:
    """``storescu -xd`` (Deflated Explicit VR Little Endian) with a 512² CT slice."""
    from sijnode.synth import generate_ct_study

    storescu = require_tool("storescu")
    study = generate_ct_study(11, 1, positive=False, n_slices=2)
    assert int(study.datasets[0].Rows) == 512
    files = write(study.datasets, tmp_path / "deflated")
    with running_node(node_settings(tmp_path)) as node:
        proc = subprocess.run(
            [storescu, "-xd", "-aec", "SIJNODE", "127.0.0.1", str(node.scp.port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
        assert len(rows) == 2
        assert {r.transfer_syntax_uid for r in rows} == {"1.2.840.10008.1.2.1.99"}
        sent = {str(ds.SOPInstanceUID): ds for ds in study.datasets}
        for row in rows:
            stored = dcmread(node.spool.path(row.spool_path))
            assert stored.PixelData == sent[row.sop_instance_uid].PixelData


def _echo(port: int, called: str = "SIJNODE", calling: str = "ECHOSCU") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejected(node: Any) -> list[Association]:
    with node.sessions() as s:
        return list(
            s.scalars(
                select(Association).where(Association.outcome == AssociationOutcome.REJECTED)
            ).all()
        )


def test_called_ae_title_is_checked(tmp_path: Path) -> None:
    with running_node(node_settings(tmp_path)) as node:
        assoc = _echo(node.scp.port, called="SOMEONE-ELSE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
        (row,) = _rejected(node)
        assert row.called_ae_title == "SOMEONE-ELSE"
        assert "called AE title" in (row.reject_reason or "")
        assoc = _echo(node.scp.port)
        assert assoc.is_established
        assoc.release()
    relaxed = node_settings(tmp_path / "any", node={"accept_any_called_ae_title": True})
    with running_node(relaxed) as node:
        assoc = _echo(node.scp.port, called="ANY-SCP")
        assert assoc.is_established
        assoc.release()


def test_association_limit_rejection_records_its_reason(tmp_path: Path) -> None:
    settings = node_settings(tmp_path, node={"max_associations": 1})
    with running_node(settings) as node:
        first = _echo(node.scp.port)
        assert first.is_established
        second = _echo(node.scp.port, calling="SECOND")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()
        (row,) = _rejected(node)
        assert row.calling_ae_title == "SECOND"
        assert row.reject_reason and "association limit of 1" in row.reject_reason
        events = count(node, Event, Event.type == EventType.ASSOCIATION_REJECTED)
        assert events == 1


def test_the_default_association_limit_takes_an_ordinary_burst(tmp_path: Path) -> None:
    """4 large and 10 small studies at once: 14 associations open together."""
    with running_node(node_settings(tmp_path)) as node:
        assert node.settings.node.max_associations >= 64
        opened = [_echo(node.scp.port, calling=f"MOD{i}") for i in range(14)]
        try:
            assert all(a.is_established for a in opened)
        finally:
            for assoc in opened:
                if assoc.is_established:
                    assoc.release()
        assert _rejected(node) == []


def test_an_association_the_audit_cannot_record_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_node(node_settings(tmp_path)) as node:
        engine = node.sessions.kw["bind"]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TRIGGER fail_association BEFORE INSERT ON associations "
                    "BEGIN SELECT RAISE(ABORT, 'simulated audit failure'); END"
                )
            )
        with caplog.at_level("ERROR", logger="sijnode.daemon.scp"):
            assoc = _echo(node.scp.port)
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x01, 0x01)
        assert any("association refused" in r.getMessage() for r in caplog.records)
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER fail_association"))
        assert send(make_study("audit-back", n=1), node.scp.port) == [SUCCESS]


def test_a_private_storage_class_is_stored_and_not_routed(tmp_path: Path) -> None:
    """A private non-image SOP class is accepted and stored; routing ignores its series."""
    study = make_study("private-class", n=4, modality="MR")
    uid = str(study[0].StudyInstanceUID)
    private = private_non_image(uid)
    with running_node(node_settings(tmp_path)) as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(PRIVATE_NON_IMAGE)
        for cx in StoragePresentationContexts[:10]:
            ae.add_requested_context(cx.abstract_syntax)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [private, *study]]
        assoc.release()
        assert statuses == [SUCCESS] * 5
        wait_for(lambda: _study_state(node, uid) == StudyState.DISPATCHED)
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
        stored = {r.sop_instance_uid: r for r in rows}
        assert stored[str(private.SOPInstanceUID)].sop_class_uid == PRIVATE_NON_IMAGE
        assert dataset_part(
            node.spool.read(stored[str(private.SOPInstanceUID)].spool_path)
        ) == dataset_part(encode(private))
        (job,) = _jobs(node)
        assert job.pipeline == "mr" and len(job.spool_paths) == 4
        assert stored[str(private.SOPInstanceUID)].spool_path not in job.spool_paths


def test_a_private_object_in_the_image_series_never_reaches_the_pipeline(
    tmp_path: Path,
) -> None:
    """A CSA Non-Image object in the same series as the MR slices: the series is routed,
    the job's inputs are the slices only, and the skipped count is in job_created."""
    study = make_study("private-in-series", n=4, modality="MR")
    uid = str(study[0].StudyInstanceUID)
    private = private_non_image(uid)
    private.SeriesInstanceUID = study[0].SeriesInstanceUID
    private.SeriesNumber = study[0].SeriesNumber
    with running_node(node_settings(tmp_path)) as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(PRIVATE_NON_IMAGE)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in [*study[:2], private, *study[2:]]]
        assoc.release()
        assert statuses == [SUCCESS] * 5
        wait_for(lambda: _study_state(node, uid) == StudyState.DISPATCHED)
        with node.sessions() as s:
            private_row = s.scalars(
                select(Instance).where(Instance.sop_class_uid == PRIVATE_NON_IMAGE)
            ).one()
            (created,) = s.scalars(select(Event).where(Event.type == EventType.JOB_CREATED))
            assert (
                private_row.series_id
                == s.scalars(
                    select(Instance.series_id).where(Instance.sop_class_uid != PRIVATE_NON_IMAGE)
                ).first()
            )
        (job,) = _jobs(node)
        assert job.pipeline == "mr" and len(job.spool_paths) == 4
        assert private_row.spool_path not in job.spool_paths
        assert created.detail["instances"] == 4 and created.detail["skipped_instances"] == 1


def test_a_study_of_only_private_objects_is_ignored_with_the_reason(tmp_path: Path) -> None:
    uid = "1.2.826.0.1.3680043.8.498.31337"
    private = private_non_image(uid)
    with running_node(node_settings(tmp_path)) as node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(PRIVATE_NON_IMAGE)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert int(assoc.send_c_store(private).Status) == SUCCESS
        assoc.release()
        wait_for(lambda: _study_state(node, uid) == StudyState.IGNORED)
        with node.sessions() as s:
            reason = s.scalars(select(Study.ignored_reason)).one()
        assert f"SOP class {PRIVATE_NON_IMAGE}" in reason and "no pipeline reads" in reason


def test_a_connection_lost_mid_commit_answers_out_of_resources(
    tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL ends the node's connection inside COMMIT (a deferred trigger that
    terminates its own backend): 0xA700 and a clean log line, no traceback; nothing
    stored, and the next instance is stored on a new connection."""
    settings = node_settings(tmp_path, db_url=pg_url, completion={"quiet_seconds": 600})
    with running_node(settings) as node:
        assert send(make_study("commit-ok", n=1), node.scp.port) == [SUCCESS]
        engine = node.sessions.kw["bind"]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE FUNCTION end_my_connection() RETURNS trigger AS $$ BEGIN "
                    "PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END "
                    "$$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER lose_connection AFTER INSERT ON instances "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                    "EXECUTE FUNCTION end_my_connection()"
                )
            )
        with caplog.at_level("INFO"):
            statuses = send(make_study("commit-lost", n=1), node.scp.port)
        assert statuses == [OUT_OF_RESOURCES]
        assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
        assert any(r.getMessage() == "instance refused" for r in caplog.records)
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER lose_connection ON instances"))
        assert send(make_study("commit-back", n=1), node.scp.port) == [SUCCESS]
        assert count(node, Instance) == 2
        assert len(node.spool.iter_files()) == 2
