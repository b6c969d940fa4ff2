"""Orthanc as the PACS: it pushes a synthetic study to sijnode over DICOM.

Orthanc runs from a temporary configuration on loopback (not the system service), with
sijnode declared as a modality. Instances are uploaded through its REST API and sent with
``POST /modalities/sijnode/store``, as a hospital PACS would route a study.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from sijnode.db.schema import Association, Instance, Job, JobState, Study, StudyState
from sijnode.synth import generate_mr_study
from tests.conftest import free_port, require_tool
from tests.nodes import node_settings, running_node, wait_for
from tests.studies import PRIVATE_NON_IMAGE, dataset_part, encode, private_non_image


def _http(url: str, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    """A running Orthanc: (REST base URL, config path, DICOM port); sijnode is added later."""
    binary = require_tool("Orthanc")
    http_port, dicom_port = free_port(), free_port()
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
                "Plugins": [],
                "DicomModalities": {},
            }
        )
    )
    log = (tmp_path / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "orthanc.log").read_text()[-2000:]
        try:
            _http(f"{base}/system")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.3)
    try:
        yield base, config, dicom_port
    finally:
        proc.terminate()
        proc.wait(30)


def test_orthanc_pushes_a_study_to_sijnode(tmp_path: Path, orthanc) -> None:
    base, _config, _ = orthanc
    study = generate_mr_study(3, 1, positive=True, n_slices=20)
    settings = node_settings(tmp_path, node={"allowed_calling_ae_titles": ["TESTPACS"]})
    with running_node(settings) as node:
        modality = json.dumps(
            {"AET": "SIJNODE", "Host": "127.0.0.1", "Port": node.scp.port}
        ).encode()
        request = urllib.request.Request(f"{base}/modalities/sijnode", data=modality, method="PUT")
        urllib.request.urlopen(request, timeout=30).read()
        ids = {
            json.loads(_http(f"{base}/instances", encode(ds)))["ParentStudy"]
            for ds in study.datasets
        }
        assert len(ids) == 1
        answer = json.loads(_http(f"{base}/modalities/sijnode/store", ids.pop().encode()))
        assert answer.get("FailedInstancesCount", 0) == 0, answer

        def dispatched() -> bool:
            with node.sessions() as s:
                return s.scalars(select(Study.state)).first() == StudyState.DISPATCHED

        wait_for(dispatched, timeout=30)
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
            job = s.scalars(select(Job)).one()
            senders = {a.calling_ae_title for a in s.scalars(select(Association))}
        assert senders == {"TESTPACS"}
        assert len(rows) == len(study.datasets)
        assert job.pipeline == "mr" and len(job.spool_paths) == len(study.datasets)
        sent = {str(ds.SOPInstanceUID): ds for ds in study.datasets}
        for row in rows:
            stored = node.spool.read(row.spool_path)
            original = sent[row.sop_instance_uid]
            # Orthanc forwards what it stored; the dataset must be the one uploaded
            assert dcmread(node.spool.path(row.spool_path)).PixelData == original.PixelData
            if row.transfer_syntax_uid == str(original.file_meta.TransferSyntaxUID):
                assert dataset_part(stored) == dataset_part(encode(original))

        def job_state() -> JobState:
            with node.sessions() as s:
                return s.scalars(select(Job.state)).one()

        wait_for(lambda: job_state() == JobState.NO_MODEL)


def test_orthanc_pushes_a_study_with_a_private_non_image_object(tmp_path: Path, orthanc) -> None:
    """Issue 9.2: one Siemens CSA Non-Image object (private SOP class) in an MR study.

    Every instance arrives and is stored, and the images are routed: the MR job reads the
    image series only."""
    base, _config, _ = orthanc
    study = generate_mr_study(4, 1, positive=False, n_slices=12)
    study_uid = str(study.datasets[0].StudyInstanceUID)
    private = private_non_image(study_uid)
    private.PatientID = study.datasets[0].PatientID  # the same patient, as Orthanc files it
    private.PatientName = study.datasets[0].PatientName
    datasets = [*study.datasets, private]
    settings = node_settings(tmp_path, node={"allowed_calling_ae_titles": ["TESTPACS"]})
    with running_node(settings) as node:
        modality = json.dumps(
            {"AET": "SIJNODE", "Host": "127.0.0.1", "Port": node.scp.port}
        ).encode()
        request = urllib.request.Request(f"{base}/modalities/sijnode", data=modality, method="PUT")
        urllib.request.urlopen(request, timeout=30).read()
        ids = {json.loads(_http(f"{base}/instances", encode(ds)))["ParentStudy"] for ds in datasets}
        assert len(ids) == 1
        answer = json.loads(_http(f"{base}/modalities/sijnode/store", ids.pop().encode()))
        assert answer.get("FailedInstancesCount", 0) == 0, answer

        def dispatched() -> bool:
            with node.sessions() as s:
                return s.scalars(select(Study.state)).first() == StudyState.DISPATCHED

        wait_for(dispatched, timeout=30)
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
            job = s.scalars(select(Job)).one()
        assert {r.sop_instance_uid for r in rows} == {str(ds.SOPInstanceUID) for ds in datasets}
        by_uid = {r.sop_instance_uid: r for r in rows}
        stored = by_uid[str(private.SOPInstanceUID)]
        assert stored.sop_class_uid == PRIVATE_NON_IMAGE
        assert dcmread(node.spool.path(stored.spool_path)).SOPClassUID == PRIVATE_NON_IMAGE
        assert job.pipeline == "mr" and len(job.spool_paths) == len(study.datasets)
        assert stored.spool_path not in job.spool_paths
