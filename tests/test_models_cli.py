"""``sijnode models import|list|show|verify``: imported files, audit rows, and refusals that
say which fault (tampered weights, unknown architecture, wrong task, truncated file)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from typer.testing import CliRunner, Result

from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.db.migrate import upgrade
from sijnode.db.schema import ModelRecord
from sijnode.errors import CheckpointError
from sijnode.models import cli as models_cli
from sijnode.models.checkpoint import SPEC_KEY, save_checkpoint
from sijnode.settings import load_settings
from tests.model_files import (
    ct_spec,
    localizer_spec,
    mr_spec,
    tiny_checkpoint,
    zero_checkpoint,
)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root."""

    models_cli.register(app, partial(load_settings, None))
    return app


@pytest.fixture
def env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An upgraded audit database and a data directory, through the environment."""
    upgrade(db_url)
    monkeypatch.setenv("SIJNODE_DATABASE__URL", db_url)
    monkeypatch.setenv("SIJNODE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _run(*args: str) -> Result:
    return CliRunner().invoke(_app(), ["models", *args])


def _refused(result: Result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, CheckpointError), result.exception
    message = str(result.exception)
    for needle in needles:
        assert needle in message, message
    return message


def test_import_list_show_verify(env: Path, tmp_path: Path, db_url: str) -> None:
    source = tmp_path / "ct.safetensors"
    spec = zero_checkpoint(source, ct_spec())
    result = _run("import", str(source), "--task", "ct")
    assert result.exit_code == 0, result.output
    assert f"imported {spec.version}" in result.output
    target = env / "models" / f"{spec.version}.safetensors"
    assert target.read_bytes() == source.read_bytes()
    # the row: version, task, spec, file relative to the data directory, size
    with make_sessionmaker(make_engine(db_url))() as s:
        (row,) = s.scalars(select(ModelRecord)).all()
        assert (row.version, row.task, row.architecture) == (
            spec.version,
            "ct_slice_classifier",
            "resnext50_32x4d",
        )
        assert row.weights_sha256 == spec.weights_sha256
        assert row.path == f"models/{spec.version}.safetensors"
        assert row.size_bytes == source.stat().st_size
        assert row.spec == spec.model_dump(mode="json")
    # importing again is idempotent
    assert _run("import", str(source)).exit_code == 0
    listed = _run("list", "--format", "json")
    assert listed.exit_code == 0, listed.output
    assert [r["version"] for r in json.loads(listed.output)] == [spec.version]
    shown = _run("show", spec.version)
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["spec"]["operating_points"]["study_threshold"] == 0.5
    assert data["file_exists"] is True
    assert _run("verify", spec.version).exit_code == 0
    assert "weights intact" in _run("verify", str(source)).output
    # the imported file changes under the audit: verify says so
    target.write_bytes(target.read_bytes()[:-3] + b"xyz")
    _refused(_run("verify", spec.version), "weights hash mismatch")
    unknown = _run("show", "ct-000000000000")
    assert unknown.exit_code != 0 and "no imported model" in str(unknown.exception)


def test_tampered_weights_are_refused(env: Path, tmp_path: Path) -> None:
    path = tmp_path / "ct.safetensors"
    tiny_checkpoint(path, ct_spec())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(_run("import", str(path)), "weights hash mismatch", "tampered")
    assert not (env / "models").exists() or not list((env / "models").iterdir())


def test_unknown_architecture_is_refused(env: Path, tmp_path: Path) -> None:
    good = tmp_path / "ct.safetensors"
    spec = tiny_checkpoint(good, ct_spec())
    raw = json.loads(spec.canonical_json())
    raw["architecture"] = "alexnet"  # no architecture sijnode builds
    bad = tmp_path / "vgg.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={SPEC_KEY: json.dumps(raw)})
    _refused(_run("import", str(bad)), "unknown architecture 'alexnet'")


def test_wrong_task_is_refused(env: Path, tmp_path: Path) -> None:
    path = tmp_path / "mr.safetensors"
    tiny_checkpoint(path, mr_spec())
    _refused(_run("import", str(path), "--task", "ct"), "wrong task", "'ct_slice_classifier'")
    loc = tmp_path / "loc.safetensors"
    zero_checkpoint(loc, localizer_spec())
    _refused(_run("verify", str(loc), "--task", "mr"), "wrong task", "'mr_roi_classifier'")
    assert _run("import", str(loc), "--task", "si_joint_localizer").exit_code == 0


def test_weights_that_do_not_fit_the_named_architecture_are_refused(
    env: Path, tmp_path: Path
) -> None:
    """A spec that names a comparison architecture (vgg16) over weights of another network,
    and a localiser whose head has the wrong shape: import and verify refuse, naming the
    tensors that differ; nothing is imported."""
    vgg = tmp_path / "vgg.safetensors"
    # a vgg16 spec over the localiser's weights (a valid file: hash and all)
    spec = ct_spec(name="ct-vgg16", architecture="vgg16")
    zero_checkpoint(tmp_path / "loc.safetensors", localizer_spec())
    save_checkpoint(vgg, spec, load_file(str(tmp_path / "loc.safetensors")))
    message = _refused(
        _run("import", str(vgg)),
        "do not fit architecture 'vgg16'",
        "missing: classifier.0.bias",
        "unexpected: features.1.bias",
        "of another shape: features.0.weight [16, 1, 3, 3] (expected [64, 3, 3, 3])",
    )
    assert "(+" in message, "a long list is cut, with a count"
    _refused(_run("verify", str(vgg)), "do not fit architecture 'vgg16'")
    assert not (env / "models").exists() or not list((env / "models").iterdir())
    # one tensor of another shape
    loc_spec = localizer_spec()
    state = load_file(str(tmp_path / "loc.safetensors"))
    state["head.3.weight"] = torch.zeros(8, 32)
    bad = tmp_path / "bad-loc.safetensors"
    save_checkpoint(bad, loc_spec, state)
    _refused(
        _run("import", str(bad)),
        "1 of another shape: head.3.weight [8, 32] (expected [8, 64])",
    )


def test_truncated_file_is_refused(env: Path, tmp_path: Path) -> None:
    path = tmp_path / "ct.safetensors"
    tiny_checkpoint(path, ct_spec())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    _refused(_run("import", str(path)), "truncated file")
    path.write_bytes(data[:4])
    _refused(_run("verify", str(path)), "truncated file")


def test_refusal_through_the_real_command(tmp_path: Path) -> None:
    """One line on stderr that names the fault, exit status 1."""
    path = tmp_path / "ct.safetensors"
    tiny_checkpoint(path, ct_spec())
    path.write_bytes(path.read_bytes()[:-5])
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from sijnode.cli import main; main()",
            "models",
            "verify",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "truncated file" in proc.stderr
