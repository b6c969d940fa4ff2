"""End to end, classify → report → deliver: synthetic CT and MR studies sent to a running
node by C-STORE (embedded worker) come back as an SR and Grad-CAM captures to DCMTK
``storescp``; every received object passes dciodvfy; a late instance supersedes the first
result and the second SR names the first in its Predecessor Documents Sequence."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from pydicom import dcmread
from pydicom.dataset import Dataset

from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.schema import Job, JobState
from sijnode.synth import generate_ct_study, generate_mr_study
from tests.conftest import free_port
from tests.deliveries import storescp
from tests.end_to_end import (
    MAX_EXPLAINED,
    SR_PREFIX,
    check_audit,
    check_received,
    ct_model,
    dciodvfy_errors,
    e2e_settings,
    job_of,
    mr_models,
    states,
    wait_job,
)
from tests.nodes import running_node, send, wait_for


def _received(out: Path) -> list[tuple[Path, Dataset]]:
    return [(p, dcmread(p)) for p in sorted(out.iterdir()) if p.is_file()]


def test_ct_study_comes_back_to_storescp(tmp_path: Path) -> None:
    model, _spec = ct_model(tmp_path / "models")
    port = free_port()
    settings = e2e_settings(tmp_path, port, pipelines={"ct": {"model": str(model)}})
    study = generate_ct_study(seed=5, subject_index=1, positive=True, n_slices=5).datasets
    uid = str(study[0].StudyInstanceUID)
    with storescp(port, tmp_path / "recv") as out, running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * len(study)
        job = wait_job(node.sessions, uid, JobState.DELIVERED)
        assert states(node.sessions, job.id)[-3:] == [
            JobState.INFERRED,
            JobState.REPORTED,
            JobState.DELIVERED,
        ]
        check_audit(node.sessions, job.id, MAX_EXPLAINED)
        received = _received(out)
        metrics = generate_latest(node.metrics.registry).decode()
    assert 'sijnode_delivery_attempts_total{kind="dicom",outcome="delivered"} 1.0' in metrics
    assert 'sijnode_delivery_seconds_count{kind="dicom"} 1.0' in metrics
    assert len(received) == 1 + MAX_EXPLAINED
    check_received(received, study, MAX_EXPLAINED)
    assert not any(str(uid) in str(p) for p in (tmp_path / "data" / "outputs").rglob("*"))


def test_mr_study_comes_back_to_storescp(tmp_path: Path) -> None:
    synth = generate_mr_study(seed=5, subject_index=7, positive=True, side="both", n_slices=5)
    mr_path, loc_path = mr_models(tmp_path / "models", synth)
    port = free_port()
    settings = e2e_settings(
        tmp_path,
        port,
        pipelines={"mr": {"model": str(mr_path), "localizer": str(loc_path)}},
    )
    study = synth.datasets
    with storescp(port, tmp_path / "recv") as out, running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * len(study)
        job = wait_job(node.sessions, synth.study_instance_uid, JobState.DELIVERED)
        check_audit(node.sessions, job.id, MAX_EXPLAINED)
        received = _received(out)
    sr = check_received(received, study, MAX_EXPLAINED)
    assert sr.Modality == "SR"


def test_a_late_instance_supersedes_and_the_second_sr_names_the_first(tmp_path: Path) -> None:
    model, _spec = ct_model(tmp_path / "models")
    port = free_port()
    settings = e2e_settings(tmp_path, port, pipelines={"ct": {"model": str(model)}})
    study = generate_ct_study(seed=5, subject_index=2, positive=True, n_slices=5).datasets
    uid = str(study[0].StudyInstanceUID)
    with storescp(port, tmp_path / "recv") as out, running_node(settings) as node:
        assert send(study[:4], node.scp.port) == [SUCCESS] * 4
        first = wait_job(node.sessions, uid, JobState.DELIVERED)
        srs = [ds for _, ds in _received(out) if str(ds.SOPClassUID).startswith(SR_PREFIX)]
        (first_sr,) = srs
        assert "PredecessorDocumentsSequence" not in first_sr
        assert send(study[4:], node.scp.port) == [SUCCESS]  # the late instance
        wait_for(lambda: (j := job_of(node.sessions, uid, newest=True)) and j.id != first.id, 60)
        second = wait_job(node.sessions, uid, JobState.DELIVERED, newest=True)
        assert states(node.sessions, second.id)[-2:] == [JobState.REPORTED, JobState.DELIVERED]
        wait_for(lambda: (j := _job(node, first.id)) and j.state is JobState.SUPERSEDED)
        received = _received(out)
    srs = [ds for _, ds in received if str(ds.SOPClassUID).startswith(SR_PREFIX)]
    assert len(srs) == 2
    (second_sr,) = [ds for ds in srs if ds.SOPInstanceUID != first_sr.SOPInstanceUID]
    (pred_study,) = second_sr.PredecessorDocumentsSequence
    assert pred_study.StudyInstanceUID == uid
    (pred_series,) = pred_study.ReferencedSeriesSequence
    assert pred_series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    (item,) = pred_series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert item.ReferencedSOPClassUID == first_sr.SOPClassUID
    for path, _ds in received:
        assert dciodvfy_errors(path) == [], path


def _job(node: Node, job_id: int) -> Job | None:
    with node.sessions() as s:
        return s.get(Job, job_id)
