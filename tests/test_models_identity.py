"""Model identity: checkpoint hashes in job keys, and no_model jobs sent again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from sijnode.daemon.scp import SUCCESS
from sijnode.db.schema import Job, JobState, JobTransition
from sijnode.errors import ConfigurationError
from sijnode.models.identity import ModelIdentities, file_sha256
from sijnode.settings import PipelineSettings
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import make_study


def test_identities_hash_checkpoints_and_notice_changes(tmp_path: Path) -> None:
    weights = tmp_path / "ct.pt"
    weights.write_bytes(b"weights v1")
    ids = ModelIdentities(
        {"ct": PipelineSettings(checkpoint=weights), "mr": PipelineSettings()}  # type: ignore[call-arg]
    )
    assert ids("mr") is None and ids("unknown") is None
    first = ids("ct")
    assert first is not None and first.weights_sha256 == file_sha256(weights)
    assert first.version == f"ct-{first.weights_sha256[:12]}"
    weights.write_bytes(b"weights v2, longer")
    os.utime(weights, ns=(1, 1))
    second = ids("ct")
    assert second is not None and second.weights_sha256 != first.weights_sha256
    weights.unlink()
    with pytest.raises(ConfigurationError, match=r"pipelines.ct.checkpoint"):
        ids("ct")


def _jobs(node) -> list[Job]:
    with node.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_new_weights_give_a_new_job_and_no_model_jobs_are_sent_again(tmp_path: Path) -> None:
    study = make_study("weights", n=3)
    plain = node_settings(tmp_path)
    with running_node(plain) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3
        job = wait_for(lambda: [j for j in _jobs(node) if j.state == JobState.NO_MODEL])[0]
        assert job.model_version is None
    weights = tmp_path / "ct.pt"
    weights.write_bytes(b"trained weights")
    with_model = plain.model_copy(
        update={"pipelines": {**plain.pipelines, "ct": PipelineSettings(checkpoint=weights)}}  # type: ignore[call-arg]
    )
    with running_node(with_model, migrate=False) as node:
        # the waiting job is sent again at start-up and runs once more
        def waits() -> list[str | None]:
            with node.sessions() as s:
                return list(
                    s.scalars(
                        select(JobTransition.detail)
                        .where(JobTransition.state == JobState.NO_MODEL)
                        .order_by(JobTransition.id)
                    )
                )

        details = wait_for(lambda: len(waits()) == 2 and waits())
        assert _jobs(node)[0].attempts == 2
        assert "no model configured" in details[0]
        assert "no implementation" in details[-1]
        # the same study again, now with a model: a new job under the new model version
        assert send(study, node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: len(_jobs(node)) == 2)
        old, new = _jobs(node)
        assert new.model_version == f"ct-{file_sha256(weights)[:12]}"
        assert new.weights_sha256 == file_sha256(weights)
        assert old.state == JobState.SUPERSEDED and old.superseded_by_id == new.id
