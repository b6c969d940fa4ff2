"""End to end with Orthanc as a real PACS: a synthetic CT study is uploaded to Orthanc
(REST ``POST /instances``), Orthanc pushes it to the node (``/modalities/sijnode/store``),
the node classifies it (embedded worker), builds the SR and Grad-CAM captures and sends
them back with Storage Commitment. Orthanc's N-EVENT-REPORT comes back on a new
association to the node's own listener (``delivery.commitment_port = 0``). What Orthanc
holds is checked through its REST API: the results are in the same study."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from sijnode.db.schema import Delivery, DeliveryStatus, JobState, Output
from sijnode.synth import generate_ct_study
from tests.conftest import free_port
from tests.end_to_end import MAX_EXPLAINED, ct_model, e2e_settings, wait_job
from tests.nodes import running_node
from tests.studies import encode
from tests.test_delivery_orthanc import (  # noqa: F401 - orthanc: a fixture
    Orthanc,
    _get,
    _post,
    orthanc,
)

NODE_PORT = free_port()


@pytest.mark.parametrize("orthanc", [NODE_PORT], indirect=True)
def test_orthanc_gets_the_results_in_the_same_study_and_commits_them(
    tmp_path: Path,
    orthanc: Orthanc,  # noqa: F811 - the fixture imported above
) -> None:
    model, _spec = ct_model(tmp_path / "models")
    settings = e2e_settings(
        tmp_path,
        orthanc.dicom_port,
        pipelines={"ct": {"model": str(model)}},
        node={"port": NODE_PORT, "allowed_calling_ae_titles": ["TESTPACS"]},
        destination={"ae_title": "TESTPACS", "storage_commitment": True},
    )
    assert settings.delivery.commitment_port == 0  # the node's listener takes the reports
    study = generate_ct_study(seed=5, subject_index=3, positive=True, n_slices=5).datasets
    uid = str(study[0].StudyInstanceUID)
    parents = {
        _post(f"{orthanc.base}/instances", encode(ds))["ParentStudy"]  # type: ignore[index]
        for ds in study
    }
    (orthanc_study,) = parents
    with running_node(settings) as node:
        _post(f"{orthanc.base}/modalities/sijnode/store", orthanc_study.encode())
        job = wait_job(node.sessions, uid, JobState.DELIVERED)
        with node.sessions() as s:
            delivery = s.scalars(select(Delivery).where(Delivery.job_id == job.id)).one()
            outputs = s.scalars(select(Output).where(Output.job_id == job.id)).all()
        assert delivery.status is DeliveryStatus.DELIVERED
        assert delivery.committed_at is not None, "Orthanc confirmed Storage Commitment"
        assert delivery.commitment_transaction_uid
    series = _get(f"{orthanc.base}/studies/{orthanc_study}/series?expand")
    assert isinstance(series, list)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "OT", "SR"]
    held = set(orthanc.study_instances(uid))
    assert {o.sop_instance_uid for o in outputs} <= held
    assert len(held) == len(study) + 1 + MAX_EXPLAINED
    studies = _get(f"{orthanc.base}/studies")
    assert studies == [orthanc_study], "no second study was made"
