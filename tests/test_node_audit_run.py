"""A real node run on synthetic studies, then the audit commands over what it recorded.

``sijnode serve`` runs as its own process and DCMTK ``storescu`` sends synthetic CT and MR
studies. Inference does not exist yet, so predictions and deliveries are added through the
db layer's own API, as the inference and delivery parts will. Then every ``sijnode audit``
query runs on the result, and the whole run is searched for the studies' PatientID,
PatientName and AccessionNumber: tables, log lines, spool paths and command output.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import inspect, select, text

from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.records import (
    get_or_create_delivery,
    record_delivery_outcome,
    record_prediction,
)
from sijnode.db.schema import DeliveryStatus, Job, JobState, Study
from sijnode.synth import generate_ct_study, generate_mr_study, write_study
from tests.conftest import free_port, require_tool
from tests.nodes import wait_for

SIJNODE = str(Path(sys.executable).parent / "sijnode")


def _env(tmp_path: Path, db_url: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": db_url,
            "SIJNODE_DATABASE__PSEUDONYM_SECRET": "site-secret",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_NODE__PORT": str(port),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_METRICS__PORT": "0",
            "SIJNODE_COMPLETION__QUIET_SECONDS": "2",
            "SIJNODE_COMPLETION__CONTENT_QUIET_SECONDS": "0.5",
            "SIJNODE_COMPLETION__CHECK_INTERVAL_SECONDS": "0.2",
            "SIJNODE_LOGGING__LEVEL": "DEBUG",
        }
    )
    return env


def _audit(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [SIJNODE, "audit", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_real_run_then_audit_queries_without_identifiers(tmp_path: Path, db_url: str) -> None:
    storescu = require_tool("storescu")
    studies = [generate_ct_study(7, i + 1, positive=bool(i % 2), n_slices=6) for i in range(2)] + [
        generate_mr_study(7, 10 + i, positive=bool(i % 2), n_slices=20) for i in range(2)
    ]
    identifiers: set[str] = set()
    for study in studies:
        ds = study.datasets[0]
        name = str(ds.PatientName)
        identifiers |= {str(ds.PatientID), name, str(ds.AccessionNumber), str(ds.PatientBirthDate)}
        identifiers.add(name.split("^")[-1])  # the given-name part, e.g. SUBJECT001
    assert len(identifiers) == 5 * len(studies)

    upgrade(db_url)
    port = free_port()
    env = _env(tmp_path, db_url, port)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        node = subprocess.Popen([SIJNODE, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ae = AE()
        ae.add_requested_context("1.2.840.10008.1.1")

        def listening() -> bool:
            assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
            up = bool(assoc.is_established)
            if up:
                assoc.release()
            return up

        wait_for(listening, timeout=60, interval=0.3)
        for study in studies:
            folder = write_study(study, tmp_path / "in")
            files = sorted(str(p) for p in folder.rglob("*.dcm"))
            proc = subprocess.run(
                [storescu, "-aet", "MODALITY1", "-aec", "SIJNODE", "127.0.0.1", str(port), *files],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr
        sessions = make_sessionmaker(make_engine(db_url))

        def waiting_jobs() -> list[Job]:
            with sessions() as s:
                jobs = list(s.scalars(select(Job).where(Job.state == JobState.NO_MODEL)))
            return jobs if len(jobs) == len(studies) else []

        jobs = wait_for(waiting_jobs, timeout=90)
    finally:
        node.terminate()
        node.wait(30)
    assert {j.pipeline for j in jobs} == {"ct", "mr"}

    # What the inference and delivery parts will write, through the same API.
    truth_rows = []
    with transaction(sessions) as s:
        for job in s.scalars(select(Job).order_by(Job.id)):
            study = s.get_one(Study, job.study_id)
            positive = next(
                x.positive for x in studies if x.study_instance_uid == study.study_instance_uid
            )
            transition(s, job, JobState.RUNNING)  # the worker, now with a model
            transition(s, job, JobState.INFERRED)
            record_prediction(
                s,
                job,
                0.8 if positive else 0.3,
                positive,
                0.5,
                level="study",
                slice_scores=[("1.2.3", 0.5)],
            )
            transition(s, job, JobState.REPORTED)
            delivery = get_or_create_delivery(s, job, "pacs")
            record_delivery_outcome(s, delivery, "delivered", DeliveryStatus.DELIVERED)
            transition(s, job, JobState.DELIVERED)
            truth_rows.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "label": int(positive),
                    "reader_id": "r1",
                }
            )
    truth = tmp_path / "truth.csv"
    with truth.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["study_instance_uid", "label", "reader_id"])
        writer.writeheader()
        writer.writerows(truth_rows)

    outputs = []
    listed = json.loads(_audit(env, "studies", "--format", "json"))
    outputs.append(json.dumps(listed))
    assert len(listed) == len(studies)
    by_sender = json.loads(_audit(env, "studies", "--sender", "MODALITY1", "--format", "json"))
    assert len(by_sender) == len(studies)
    mr_jobs = json.loads(_audit(env, "jobs", "--pipeline", "mr", "--format", "json"))
    assert len(mr_jobs) == 2
    outputs.append(json.dumps(mr_jobs))
    delivered = json.loads(_audit(env, "jobs", "--delivery", "delivered", "--format", "json"))
    assert len(delivered) == len(studies)
    timeline = _audit(env, "timeline", studies[0].study_instance_uid, "--format", "json")
    outputs.append(timeline)
    stages = json.dumps(json.loads(timeline))
    for stage in ("received", "complete", "dispatched", "inferred", "reported", "delivered"):
        assert stage in stages
    export = tmp_path / "predictions.csv"
    _audit(env, "export", "--what", "predictions", "--format", "csv", "--out", str(export))
    outputs.append(export.read_text())
    assert len(list(csv.DictReader(export.open()))) >= len(studies)
    summary = _audit(env, "summary", "--format", "json")
    outputs.append(summary)
    assert json.loads(summary)
    outputs.append(_audit(env, "truth", "import", str(truth)))
    metrics = json.loads(_audit(env, "metrics", "--format", "json", "--resamples", "200"))
    outputs.append(json.dumps(metrics))
    assert "accuracy" in json.dumps(metrics)
    outputs.append(_audit(env, "studies"))  # the terminal table

    # No patient identifier anywhere: tables, logs, spool paths, command output.
    engine = make_engine(db_url)
    dumped = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            for row in conn.execute(text(f'select * from "{table}"')):
                dumped.append(" ".join(str(v) for v in row))
    haystacks = {
        "tables": "\n".join(dumped),
        "logs": log_path.read_text(),
        "paths": "\n".join(str(p) for p in (tmp_path / "spool").rglob("*")),
        "commands": "\n".join(outputs),
    }
    assert len(haystacks["logs"].splitlines()) > 20, "the node should have logged its work"
    for where, haystack in haystacks.items():
        for identifier in identifiers:
            assert identifier not in haystack, f"{identifier!r} found in {where}"
