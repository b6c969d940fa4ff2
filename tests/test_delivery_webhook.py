"""The triage webhook: a positive result is POSTed to a local http.server, retried with
backoff until the endpoint answers, with no identifier unless the site allows the
accession number."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from sijnode.db.schema import Delivery, DeliveryStatus, Job, JobState, utcnow
from sijnode.delivery.scheduler import DeliveryScheduler
from tests.conftest import free_port
from tests.deliveries import delivery_settings, make_results, seed_job, sessions_for
from tests.studies import ACCESSION

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate")


class Endpoint:
    """A real HTTP endpoint that answers ``codes`` in turn (then 200) and keeps bodies."""

    def __init__(self, port: int, codes: list[int]) -> None:
        self.codes = list(codes)
        self.bodies: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.raw.append(data)
                endpoint.bodies.append(json.loads(data))
                code = endpoint.codes.pop(0) if endpoint.codes else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def _webhook(sessions) -> Delivery:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.scalars(select(Delivery).where(Delivery.kind == "webhook")).one()


def test_webhook_is_retried_until_the_endpoint_answers(tmp_path: Path, port: int) -> None:
    settings = delivery_settings(
        tmp_path,
        delivery={"max_attempts": 5, "webhook": {"url": f"http://127.0.0.1:{port}/triage"}},
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    scheduler.enqueue(job_id, now=t0)
    scheduler.run_due(t0)  # nothing listens yet: connection refused
    assert _webhook(sessions).status is DeliveryStatus.RETRYING
    with Endpoint(port, [503, 500]) as endpoint:
        for minutes in (1, 2, 3):
            scheduler.run_due(t0 + timedelta(minutes=minutes))
        scheduler.run_due(t0 + timedelta(hours=1))
    d = _webhook(sessions)
    assert d.status is DeliveryStatus.DELIVERED and d.attempts == 4
    assert len(endpoint.bodies) == 3  # 503, 500, then 200; never again after
    body = endpoint.bodies[-1]
    assert body == {
        "study_instance_uid": results.study_instance_uid,
        "pipeline": "mr",
        "decision": "present",
        "probability": 0.87,
        "model_version": "mr-test-1.0",
        "research_use_only": True,
    }
    source = results.source[0]
    for raw in endpoint.raw:
        for name in (*IDENTIFIERS, "AccessionNumber"):
            value = str(source.get(name, ""))
            assert value or name == "PatientBirthDate", f"the synthetic study lacks {name}"
            if value:
                assert value.encode() not in raw, name
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        # the webhook is a notification: the job waits for its result deliveries (none here)
        assert job.state is JobState.REPORTED


def test_accession_number_only_where_allowed(tmp_path: Path, port: int) -> None:
    settings = delivery_settings(
        tmp_path,
        delivery={
            "webhook": {"url": f"http://127.0.0.1:{port}/", "include_accession_number": True}
        },
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    results.source[0].AccessionNumber = ACCESSION
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    with Endpoint(port, []) as endpoint:
        scheduler.enqueue(job_id)
        scheduler.run_due()
    assert endpoint.bodies[0]["accession_number"] == ACCESSION
    assert "PatientID" not in json.dumps(endpoint.bodies[0])


def test_no_webhook_for_a_negative_result(tmp_path: Path, port: int) -> None:
    settings = delivery_settings(
        tmp_path, delivery={"webhook": {"url": f"http://127.0.0.1:{port}/"}}
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results, label=False)
    scheduler = DeliveryScheduler(settings, sessions)
    assert scheduler.enqueue(job_id) == []


def test_a_client_error_is_permanent(tmp_path: Path, port: int) -> None:
    settings = delivery_settings(
        tmp_path, delivery={"webhook": {"url": f"http://127.0.0.1:{port}/"}}
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    t0 = utcnow()
    with Endpoint(port, [400, 400]) as endpoint:
        scheduler.enqueue(job_id, now=t0)
        scheduler.run_due(t0)
        scheduler.run_due(t0 + timedelta(hours=1))
    assert len(endpoint.bodies) == 1
    d = _webhook(sessions)
    assert d.status is DeliveryStatus.DEAD and d.last_status == 400


def test_shadow_mode_posts_nothing(tmp_path: Path, port: int) -> None:
    settings = delivery_settings(
        tmp_path,
        delivery={"shadow_mode": True, "webhook": {"url": f"http://127.0.0.1:{port}/"}},
    )
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    scheduler = DeliveryScheduler(settings, sessions)
    with Endpoint(port, []) as endpoint:
        scheduler.enqueue(job_id)
        scheduler.run_due(utcnow() + timedelta(days=1))
    assert endpoint.bodies == []
    assert _webhook(sessions).status is DeliveryStatus.SHADOW
