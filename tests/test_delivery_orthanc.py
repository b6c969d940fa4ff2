"""Orthanc as the PACS that results go to: C-STORE with Storage Commitment (Orthanc is a
Storage Commitment SCP and sends its N-EVENT-REPORT on a new association to the node's
AE title), and STOW-RS through Orthanc's DICOMweb plugin. What arrived is checked
through Orthanc's REST API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from sijnode.db.schema import Delivery, DeliveryAttempt, DeliveryStatus, Job, JobState
from sijnode.delivery.scheduler import DeliveryScheduler
from tests.conftest import free_port, require_tool
from tests.deliveries import delivery_settings, make_results, seed_job, sessions_for

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


class Orthanc:
    """A running Orthanc on loopback."""

    def __init__(self, base: str, dicom_port: int, log: Path) -> None:
        self.base = base
        self.dicom_port = dicom_port
        self.log = log

    def study_instances(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs Orthanc holds in the study ``study_uid``."""
        studies = _get(f"{self.base}/studies?expand")
        assert isinstance(studies, list)
        uids: list[str] = []
        for study in studies:
            if study["MainDicomTags"]["StudyInstanceUID"] != study_uid:
                continue
            instances = _get(f"{self.base}/studies/{study['ID']}/instances?expand")
            assert isinstance(instances, list)
            uids += [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]
        return uids


@pytest.fixture
def orthanc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb, knowing the node (AE SIJNODE) as a modality whose
    Storage Commitment reports go to ``request.param`` (the commitment port)."""
    binary = require_tool("Orthanc")
    if not DICOMWEB_PLUGIN.is_file():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing; apt-get install orthanc-dicomweb")
    http_port, dicom_port = free_port(), free_port()
    commitment_port = request.param or 11112  # STOW tests: a port nothing uses
    config = tmp_path / "orthanc.json"
    config.write_text(
        json.dumps(
            {
                "Name": "test-pacs",
                "StorageDirectory": str(tmp_path / "orthanc-db"),
                "IndexDirectory": str(tmp_path / "orthanc-db"),
                "HttpPort": http_port,
                "DicomPort": dicom_port,
                "DicomAet": "TESTPACS",
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "Plugins": [str(DICOMWEB_PLUGIN)],
                "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                "DicomModalities": {
                    "sijnode": {
                        "AET": "SIJNODE",
                        "Host": "127.0.0.1",
                        "Port": commitment_port,
                        "AllowStorageCommitment": True,
                    }
                },
            }
        )
    )
    log = tmp_path / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, str(config)], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            _get(f"{base}/system")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.3)
    try:
        yield Orthanc(base, dicom_port, log)
    finally:
        proc.terminate()
        proc.wait(30)


COMMITMENT_PORT = free_port()


@pytest.mark.parametrize("orthanc", [COMMITMENT_PORT], indirect=True)
def test_orthanc_stores_and_confirms_storage_commitment(tmp_path: Path, orthanc: Orthanc) -> None:
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {
                "name": "orthanc",
                "ae_title": "TESTPACS",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_port": COMMITMENT_PORT, "check_interval_seconds": 0.2},
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.start()
    try:
        scheduler.enqueue(job_id)
        deadline = time.monotonic() + 60
        while True:
            with sessions() as s:
                d = s.scalars(select(Delivery)).one()
                if d.status is DeliveryStatus.DELIVERED:
                    break
                assert d.status in (DeliveryStatus.PENDING, DeliveryStatus.COMMITTING), (
                    d.status,
                    d.last_error,
                    orthanc.log.read_text()[-3000:],
                )
            assert time.monotonic() < deadline, f"not committed: {d.status} {d.last_error}"
            time.sleep(0.2)
    finally:
        scheduler.stop()
    assert sorted(orthanc.study_instances(results.study_instance_uid)) == sorted(
        results.sop_instance_uids
    )
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
        rows = s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)).all()
        attempts = [a.outcome for a in rows]
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state is JobState.DELIVERED
    assert d.committed_at is not None and d.commitment_transaction_uid
    assert attempts == ["committing", "committed"]
    assert d.attempts == 1


@pytest.mark.parametrize("orthanc", [0], indirect=True)
def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path, orthanc: Orthanc) -> None:
    settings = delivery_settings(
        tmp_path,
        destinations=[
            {"name": "web", "kind": "stow", "url": f"{orthanc.base}/dicom-web"},
        ],
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
        assert d.kind == "stow"
        assert d.status is DeliveryStatus.DELIVERED, d.last_error
        assert sorted(d.sop_instance_uids or []) == sorted(results.sop_instance_uids)
    assert sorted(orthanc.study_instances(results.study_instance_uid)) == sorted(
        results.sop_instance_uids
    )


@pytest.mark.parametrize("orthanc", [0], indirect=True)
def test_stow_rs_to_a_wrong_path_is_permanent(tmp_path: Path, orthanc: Orthanc) -> None:
    settings = delivery_settings(
        tmp_path, destinations=[{"name": "web", "kind": "stow", "url": f"{orthanc.base}/nope"}]
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    scheduler.enqueue(job_id)
    scheduler.run_due()
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
    assert d.status is DeliveryStatus.DEAD and d.last_status == 404
    assert "HTTP 404" in (d.last_error or "")


E2E_COMMITMENT_PORT = free_port()


def _put_modality(base: str, port: int) -> None:
    body = json.dumps(
        {"AET": "SIJNODE", "Host": "127.0.0.1", "Port": port, "AllowStorageCommitment": True}
    ).encode()
    request = urllib.request.Request(f"{base}/modalities/sijnode", data=body, method="PUT")
    urllib.request.urlopen(request, timeout=30).read()


def _post(url: str, data: bytes) -> object:
    request = urllib.request.Request(url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("orthanc", [E2E_COMMITMENT_PORT], indirect=True)
def test_results_return_to_the_same_study_in_orthanc(tmp_path: Path, orthanc: Orthanc) -> None:
    """Orthanc pushes a study to a running node; the job's results (made here, in place
    of the report builders) go back with Storage Commitment into the same study."""
    from pydicom import dcmread

    from sijnode.db.engine import transaction
    from sijnode.db.lifecycle import transition
    from sijnode.db.records import record_output, record_prediction
    from sijnode.db.schema import OutputKind
    from sijnode.delivery.scheduler import enqueue_job
    from sijnode.synth import generate_mr_study
    from tests.nodes import node_settings, running_node, wait_for
    from tests.studies import encode

    study = generate_mr_study(5, 1, positive=True, n_slices=6)
    settings = node_settings(
        tmp_path,
        node={"allowed_calling_ae_titles": ["TESTPACS"]},
        destinations=[
            {
                "name": "orthanc",
                "ae_title": "TESTPACS",
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "storage_commitment": True,
            }
        ],
        delivery={"commitment_port": E2E_COMMITMENT_PORT},
    )
    with running_node(settings) as node:
        _put_modality(orthanc.base, node.scp.port)
        ids = {
            _post(f"{orthanc.base}/instances", encode(ds))["ParentStudy"]  # type: ignore[index]
            for ds in study.datasets
        }
        orthanc_study = ids.pop()
        _post(f"{orthanc.base}/modalities/sijnode/store", orthanc_study.encode())

        def job_id() -> int | None:
            with node.sessions() as s:
                job = s.scalars(select(Job)).first()
                return None if job is None or job.state is not JobState.NO_MODEL else job.id

        jid = wait_for(job_id, timeout=60)
        with node.sessions() as s:
            job = s.get(Job, jid)
            assert job is not None
            source = [dcmread(node.spool.path(p)) for p in job.spool_paths]
        results = make_results(tmp_path / "out", source=source)
        with transaction(node.sessions) as s:
            job = s.get(Job, jid)
            assert job is not None
            transition(s, job, JobState.RUNNING)  # no_model → running → inferred
            transition(s, job, JobState.INFERRED)
            record_prediction(s, job, 0.9, True, 0.5, level="subject")
            for path in results.files:
                ds = dcmread(path, stop_before_pixels=True)
                kind = OutputKind.SR if "88." in str(ds.SOPClassUID) else OutputKind.SC
                record_output(
                    s, job, kind, ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, str(path)
                )
            transition(s, job, JobState.REPORTED)
            enqueue_job(s, settings, job)
        _put_modality(orthanc.base, E2E_COMMITMENT_PORT)  # reports go to the listener
        node.delivery.wake()  # the node's own delivery loop sends it

        def delivered() -> bool:
            with node.sessions() as s:
                return s.scalars(select(Job.state)).one() is JobState.DELIVERED

        wait_for(delivered, timeout=60)
    series = _get(f"{orthanc.base}/studies/{orthanc_study}/series?expand")
    assert isinstance(series, list)
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["MR", "OT", "SR"]
    held = orthanc.study_instances(str(study.datasets[0].StudyInstanceUID))
    assert set(results.sop_instance_uids) <= set(held)
    assert len(held) == len(study.datasets) + len(results.files)
    with node.sessions() as s:
        d = s.scalars(select(Delivery)).one()
    assert d.committed_at is not None
