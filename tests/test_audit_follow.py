"""``sijnode audit timeline STUDY --follow | --wait``: a real node receives a study while
the command waits in another process; it prints the stages as they happen and ends when
the awaited stage is reached, or exits 1 naming the stage it waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sijnode.db.schema import JobState
from tests.nodes import node_settings, running_node, send
from tests.studies import make_study

CLI = [sys.executable, "-c", "from sijnode.cli import main; main()"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SIJNODE_DATABASE__URL"] = f"sqlite:///{tmp_path / 'audit.db'}"
    env["SIJNODE_DATABASE__PSEUDONYM_SECRET"] = "test-secret"
    return env


def test_follow_waits_for_a_study_that_is_still_to_come(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)  # no model: the job ends in no_model
    study = make_study("follow", n=4)
    uid = str(study[0].StudyInstanceUID)
    with running_node(settings) as node:
        follow = subprocess.Popen(
            [*CLI, "audit", "timeline", uid, "--follow", "--timeout", "60"],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert send(study, node.settings.node.port) == [0] * 4
        out, err = follow.communicate(timeout=90)
        assert follow.returncode == 0, err
        stages = [line.split()[3] for line in out.splitlines()]
        assert stages[0] == "received"
        assert stages.index("complete") > stages.index("last_received")
        assert stages[-1] == JobState.NO_MODEL.value, out  # done: nothing more will happen
        assert len(stages) == len(set(stages)), "each stage is printed once"

        waited = subprocess.run(
            [*CLI, "audit", "timeline", uid, "--wait", "--until", "complete", "-f", "csv"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert waited.returncode == 0, waited.stderr
        header = set(waited.stdout.splitlines()[0].split(","))
        assert header == {"at", "elapsed_s", "stage", "job_id", "detail"}
        assert ",complete," in waited.stdout

        late = subprocess.run(
            [*CLI, "audit", "timeline", uid, "--wait", "--until", "delivered", "--timeout", "1"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert late.returncode == 1
        assert f"study {uid} did not reach 'delivered' within 1 s" in late.stderr
        assert "latest stage no_model" in late.stderr


def test_wait_for_a_study_never_sent_times_out_clearly(tmp_path: Path) -> None:
    settings = node_settings(tmp_path)
    with running_node(settings):
        done = subprocess.run(
            [*CLI, "audit", "timeline", "2.25.404", "--wait", "--timeout", "1"],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "study 2.25.404 did not reach 'done' within 1 s: it is not in the audit" in done.stderr
