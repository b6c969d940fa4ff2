"""Model identity: versions from checkpoint headers in job keys, the MR model set, no torch
in the listener, and no_model jobs that name what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from sijnode.daemon.scp import SUCCESS
from sijnode.db.schema import Job, JobState, JobTransition
from sijnode.errors import ConfigurationError, NoModelError
from sijnode.models.identity import ModelIdentities, imported_path
from sijnode.settings import PipelineSettings
from tests.model_files import ct_spec, localizer_spec, mr_spec, tiny_checkpoint
from tests.nodes import node_settings, running_node, send, wait_for
from tests.studies import make_study


def _ids(data_dir: Path, **pipelines: PipelineSettings) -> ModelIdentities:
    return ModelIdentities(
        {"ct": PipelineSettings(), "mr": PipelineSettings(), **pipelines}, data_dir
    )


def test_identity_is_the_header_version_and_notices_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "ct.safetensors"
    spec = tiny_checkpoint(path, ct_spec())
    ids = _ids(tmp_path, ct=PipelineSettings(model=str(path)))
    assert ids("mr") is None and ids("unknown") is None
    first = ids("ct")
    assert first is not None
    assert first.version == spec.version and first.version.startswith("ct-")
    assert first.weights_sha256 == spec.weights_sha256
    assert first.checkpoints() == {"model": path}
    # new weights: a new version (the job key changes)
    second_spec = tiny_checkpoint(path, ct_spec(), fill=1.0)
    os.utime(path, ns=(1, 1))
    second = ids("ct")
    assert second is not None and second.version == second_spec.version != first.version
    # a new threshold is a new version too
    again = _ids(tmp_path, ct=PipelineSettings(model=str(path), threshold=0.7))("ct")
    assert again is not None and again.version not in (first.version, second.version)
    path.unlink()
    with pytest.raises(ConfigurationError, match=r"pipelines.ct.model = .*existing checkpoint"):
        ids("ct")


def test_usable_says_whether_a_pipeline_has_a_model_set_it_can_use(tmp_path: Path) -> None:
    """One answer for the node and the embedded worker: any configuration error is no."""
    ct = tmp_path / "ct.safetensors"
    tiny_checkpoint(ct, ct_spec())
    mr = tmp_path / "mr.safetensors"
    tiny_checkpoint(mr, mr_spec())
    ids = _ids(
        tmp_path,
        ct=PipelineSettings(model=str(ct)),
        mr=PipelineSettings(model=str(mr)),  # no localizer: NoModelError
        gone=PipelineSettings(model=str(tmp_path / "missing.safetensors")),
    )
    assert ids.usable("ct")
    assert not ids.usable("mr") and not ids.usable("gone") and not ids.usable("unknown")
    with pytest.raises(NoModelError):
        ids("mr")
    with pytest.raises(ConfigurationError):
        ids("gone")


def test_identity_of_an_imported_version(tmp_path: Path) -> None:
    spec = ct_spec()
    staged = tmp_path / "staged.safetensors"
    spec = tiny_checkpoint(staged, spec)
    with pytest.raises(ConfigurationError, match="no imported model of that version"):
        _ids(tmp_path, ct=PipelineSettings(model=spec.version))("ct")
    target = imported_path(tmp_path, spec.version)
    target.parent.mkdir(parents=True)
    staged.rename(target)
    identity = _ids(tmp_path, ct=PipelineSettings(model=spec.version))("ct")
    assert identity is not None and identity.checkpoint == target
    # a file under a version's name that holds another model is refused
    other = tiny_checkpoint(tmp_path / "o.safetensors", ct_spec(name="other"))
    (tmp_path / "o.safetensors").replace(target)
    with pytest.raises(ConfigurationError, match=f"holds model {other.version}"):
        _ids(tmp_path, ct=PipelineSettings(model=spec.version))("ct")


def test_wrong_task_for_the_pipeline_is_refused(tmp_path: Path) -> None:
    mr = tmp_path / "mr.safetensors"
    tiny_checkpoint(mr, mr_spec())
    with pytest.raises(ConfigurationError, match="wrong task: expected a 'ct_slice_classifier'"):
        _ids(tmp_path, ct=PipelineSettings(model=str(mr)))("ct")
    loc = tmp_path / "loc.safetensors"
    tiny_checkpoint(loc, localizer_spec())
    with pytest.raises(ConfigurationError, match=r"pipelines.mr.model .*wrong task"):
        _ids(tmp_path, mr=PipelineSettings(model=str(loc)))("mr")
    with pytest.raises(ConfigurationError, match=r"pipelines.mr.localizer .*wrong task"):
        _ids(tmp_path, mr=PipelineSettings(model=str(mr), localizer=str(mr)))("mr")


def test_mr_identity_covers_classifier_and_localizer(tmp_path: Path) -> None:
    mr, loc = tmp_path / "mr.safetensors", tmp_path / "loc.safetensors"
    mr_version = tiny_checkpoint(mr, mr_spec()).version
    loc_version = tiny_checkpoint(loc, localizer_spec()).version
    with pytest.raises(NoModelError, match=r"needs an SI-joint localizer .*pipelines.mr.localizer"):
        _ids(tmp_path, mr=PipelineSettings(model=str(mr)))("mr")
    identity = _ids(tmp_path, mr=PipelineSettings(model=str(mr), localizer=str(loc)))("mr")
    assert identity is not None
    assert identity.implementation == "mr"
    assert [(m.role, m.version) for m in identity.members] == [
        ("model", mr_version),
        ("localizer", loc_version),
    ]
    assert identity.version.startswith("mr-set-") and len(identity.version) <= 64
    assert identity.checkpoints() == {"model": mr, "localizer": loc}
    # another localiser: another set version
    tiny_checkpoint(loc, localizer_spec(), fill=2.0)
    os.utime(loc, ns=(2, 2))
    other = _ids(tmp_path, mr=PipelineSettings(model=str(mr), localizer=str(loc)))("mr")
    assert other is not None and other.version != identity.version


def test_the_listener_never_imports_torch(tmp_path: Path) -> None:
    """`sijnode serve`'s import graph, and reading model identities, leave torch out."""
    path = tmp_path / "ct.safetensors"
    tiny_checkpoint(path, ct_spec())
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from sijnode.cli import _register_parts
        _register_parts()
        import sijnode.daemon.node, sijnode.daemon.cli, sijnode.workers.embedded
        import sijnode.workers.celery_app, sijnode.workers.inference, sijnode.models.cli
        from sijnode.models.identity import ModelIdentities
        from sijnode.settings import PipelineSettings
        ids = ModelIdentities({{"ct": PipelineSettings(model={str(path)!r})}}, Path("."))
        print(ids("ct").version)
        print("torch" in sys.modules, "torchvision" in sys.modules)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["False", "False"], proc.stdout


def _jobs(node) -> list[Job]:
    with node.sessions() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def _details(node, state: JobState) -> list[str]:
    with node.sessions() as s:
        return [
            d or ""
            for d in s.scalars(
                select(JobTransition.detail)
                .where(JobTransition.state == state)
                .order_by(JobTransition.id)
            )
        ]


def test_new_model_gives_a_new_job_and_no_model_jobs_are_sent_again(tmp_path: Path) -> None:
    study = make_study("weights", n=3)
    plain = node_settings(tmp_path)
    with running_node(plain) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3
        job = wait_for(lambda: [j for j in _jobs(node) if j.state == JobState.NO_MODEL])[0]
        assert job.model_version is None
        assert (
            "no model configured for pipeline 'ct': set pipelines.ct.model"
            in (_details(node, JobState.NO_MODEL)[0])
        )
    # weights that do not fit the architecture: the job waits, saying why
    path = tmp_path / "ct.safetensors"
    spec = tiny_checkpoint(path, ct_spec())
    with_model = node_settings(tmp_path, pipelines={"ct": {"model": str(path), "device": "cpu"}})
    with running_node(with_model, migrate=False) as node:
        wait_for(lambda: len(_details(node, JobState.NO_MODEL)) == 2, timeout=60)
        assert _jobs(node)[0].attempts == 2
        assert "cannot be loaded" in _details(node, JobState.NO_MODEL)[-1]
        # the same study again, now with a model: a new job under the model's version
        assert send(study, node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: len(_jobs(node)) == 2, timeout=30)
        old, new = _jobs(node)
        assert new.model_version == spec.version
        assert new.weights_sha256 == spec.weights_sha256
        assert old.state == JobState.SUPERSEDED and old.superseded_by_id == new.id


def test_mr_job_without_localizer_waits_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "mr.safetensors"
    tiny_checkpoint(path, mr_spec())
    settings = node_settings(tmp_path, pipelines={"mr": {"model": str(path)}})
    with running_node(settings) as node:
        assert send(make_study("mr-noloc", n=3, modality="MR"), node.scp.port) == [SUCCESS] * 3
        wait_for(lambda: _details(node, JobState.NO_MODEL), timeout=30)
        (detail,) = _details(node, JobState.NO_MODEL)
        assert "needs an SI-joint localizer" in detail and "pipelines.mr.localizer" in detail
        (job,) = _jobs(node)
        assert job.pipeline == "mr" and job.model_version is None
