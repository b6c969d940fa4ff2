"""``scripts/demo`` in a reduced form: the whole loop with Orthanc as the PACS, on tiny
seeded checkpoints instead of the quick training (``--checkpoints``), and its parts: the
training cache key and lookup, and stopping everything it started on Ctrl-C / SIGTERM.

The quick training itself (``sijnode train ... --quick``) is the training tools' own test;
the full demo with training was run by hand (README, "See it work")."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sijnode.demo.models import TrainingPlan, trained_checkpoints
from sijnode.demo.processes import Processes
from sijnode.demo.run import main
from sijnode.synth import generate_mr_study
from tests.conftest import require_tool
from tests.end_to_end import ct_model, mr_models


def _running_with(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _tiny_checkpoints(folder: Path) -> Path:
    """ct, mr and localizer checkpoints at 64 px (slice thresholds 0: slices explained)."""
    ct_path, _ = ct_model(folder)
    boxes_from = generate_mr_study(seed=1002, subject_index=1, positive=True, n_slices=6)
    mr_path, loc_path = mr_models(folder, boxes_from)
    assert {ct_path.name, mr_path.name, loc_path.name} == {
        "ct.safetensors",
        "mr.safetensors",
        "localizer.safetensors",
    }
    return folder


@pytest.mark.slow
def test_demo_closes_the_loop_with_orthanc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tool("Orthanc")
    models = _tiny_checkpoints(tmp_path / "models")
    out = tmp_path / "demo"
    started = time.monotonic()
    rc = main(["--out", str(out), "--checkpoints", str(models), "--timeout", "150"])
    elapsed = time.monotonic() - started
    printed = capsys.readouterr().out
    assert rc == 0, printed
    # A table per study (2 CT, 2 MR), each delivered back to Orthanc and committed.
    for number in range(1, 5):
        assert f"study {number}: " in printed
    assert printed.count("delivered (committed)") == 4, printed
    assert printed.count("in Orthanc Explorer: http://127.0.0.1:") == 4
    assert printed.count("/app/explorer.html#study?uuid=") == 4
    assert printed.count("SR and captures: ") == 4
    for row in ("decision", "probability", "thresholds", "synthetic truth"):
        assert printed.count(row) >= 4, row
    assert printed.count("last instance → delivered") == 4
    assert "the PACS holds" in printed and "SR ×1" in printed
    assert "SR content tree" in printed and "CONTAINER" in printed
    assert "sijnode audit metrics" in printed and "sensitivity" in printed.lower()
    picture = out / "overview.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _running_with(str(tmp_path)), "the demo stopped what it started"
    assert elapsed < 240, f"the reduced demo took {elapsed:.0f} s"


@pytest.mark.slow
def test_demo_with_storescp_when_orthanc_is_not_installed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Orthanc the PACS is DCMTK: storescu sends, storescp receives the results."""
    require_tool("storescp")
    real_which = shutil.which
    monkeypatch.setattr(
        "sijnode.demo.pacs.shutil.which",
        lambda name: None if name == "Orthanc" else real_which(name),
    )
    models = _tiny_checkpoints(tmp_path / "models")
    out = tmp_path / "demo"
    args = ["--out", str(out), "--checkpoints", str(models), "--held-out", "1"]
    rc = main([*args, "--timeout", "150"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "storescp" in printed and "in Orthanc Explorer" not in printed
    assert printed.count("stage reached             │ delivered") == 2, printed
    received = list((out / "run" / "pacs" / "received").rglob("*"))
    kinds = [p.name.split(".")[0] for p in received if p.is_file()]  # storescp: SRc.UID, SC.UID
    assert sum(k.startswith("SR") for k in kinds) == 2, kinds
    assert kinds.count("SC") >= 2, kinds
    assert not _running_with(str(tmp_path))


@pytest.mark.slow
def test_demo_says_which_stage_was_not_reached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Results that do not come back in time: the demo names the stage, stops, exits 1."""
    require_tool("Orthanc")
    models = _tiny_checkpoints(tmp_path / "models")
    args = ["--out", str(tmp_path / "demo"), "--checkpoints", str(models), "--held-out", "1"]
    rc = main([*args, "--timeout", "0"])
    printed = capsys.readouterr().out
    assert rc == 1, printed
    assert printed.count("not reached") == 2, printed
    assert "(stopped at" in printed or "(the node has no such study)" in printed
    assert not _running_with(str(tmp_path))


def test_training_cache_is_keyed_by_version_and_options(tmp_path: Path) -> None:
    plan = TrainingPlan()
    assert plan.key() == TrainingPlan().key()
    other = TrainingPlan(options={**plan.options, "ct": ("--size", "96")})
    assert other.key() != plan.key()
    assert TrainingPlan(ct_subjects=plan.ct_subjects + 1).key() != plan.key()
    # Exported checkpoints in the cache are used as they are: nothing is started.
    models = _tiny_checkpoints(tmp_path / "models")
    cache = tmp_path / "cache" / plan.key()
    for name in ("ct", "mr", "localizer"):
        (cache / name).mkdir(parents=True)
        shutil.copy(models / f"{name}.safetensors", cache / name / "model.safetensors")
    said: list[str] = []
    with Processes() as procs:
        got = trained_checkpoints(procs, tmp_path / "cache", plan, tmp_path / "log", said.append)
        assert procs._procs == []
    assert got.cached and got.ct == cache / "ct" / "model.safetensors"
    assert said == [f"checkpoints from the cache {cache}"]
    assert not (tmp_path / "log").exists(), "no training ran"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_everything_started_is_stopped_on_interrupt(tmp_path: Path, how: str) -> None:
    seconds = f"{3000 + os.getpid() % 1000}.{len(how)}"  # this test's own sleeps
    marker = f"sleep {seconds}"
    script = f"sleep {seconds} & sleep {seconds} & wait"
    with pytest.raises(KeyboardInterrupt), Processes(grace=5) as procs:
        procs.start("group", ["bash", "-c", script], tmp_path / "log")
        time.sleep(0.5)
        assert len(_running_with(marker)) >= 2
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # turned into KeyboardInterrupt
            time.sleep(5)
        raise KeyboardInterrupt
    deadline = time.monotonic() + 10
    while _running_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running_with(marker), "the process group was stopped"
    assert signal.getsignal(signal.SIGTERM) is not None


def test_scripts_demo_help() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [str(root / ".venv/bin/python"), "-m", "sijnode.demo.run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert done.returncode == 0
    for option in ("--out", "--timeout", "--keep-running", "--checkpoints", "--held-out"):
        assert option in done.stdout
