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
