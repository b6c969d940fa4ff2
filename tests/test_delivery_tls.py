"""C-STORE over TLS (PS3.15 B.1) to a pynetdicom SCP that requires a client certificate:
the destination's TLS settings give the CA and the node's certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from sqlalchemy import select

from sijnode.daemon.scp import ssl_context
from sijnode.db.schema import Delivery, DeliveryStatus
from sijnode.delivery.objects import COMPREHENSIVE_SR
from sijnode.delivery.scheduler import DeliveryScheduler
from sijnode.settings import TLSSettings
from tests.conftest import free_port
from tests.deliveries import delivery_settings, make_results, seed_job, sessions_for
from tests.test_daemon_tls import pki  # noqa: F401 (the module's CA and certificates)

SC = "1.2.840.10008.5.1.4.1.1.7"


def _tls_peer(port: int, pki_dir: Path, got: list[str]) -> Any:
    server_tls = TLSSettings(
        enabled=True,
        cert_file=pki_dir / "server.pem",
        key_file=pki_dir / "server.key",
        ca_file=pki_dir / "ca.pem",
        require_client_cert=True,
    )
    ae = AE(ae_title="DEST")
    for uid in (SC, COMPREHENSIVE_SR):
        ae.add_supported_context(uid)

    def on_store(event: Any) -> int:
        got.append(str(event.dataset.SOPInstanceUID))
        return 0

    return ae.start_server(
        ("127.0.0.1", port),
        block=False,
        ssl_context=ssl_context(server_tls),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )


def test_delivery_over_mutual_tls(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    port = free_port()
    tls = {
        "enabled": True,
        "cert_file": str(pki / "client.pem"),
        "key_file": str(pki / "client.key"),
        "ca_file": str(pki / "ca.pem"),
    }
    dest = {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port, "tls": tls}
    settings = delivery_settings(tmp_path, destinations=[dest])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    got: list[str] = []
    server = _tls_peer(port, pki, got)
    try:
        scheduler = DeliveryScheduler(settings, sessions)
        scheduler.enqueue(job_id)
        scheduler.run_due()
    finally:
        server.shutdown()
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
    assert d.status is DeliveryStatus.DELIVERED, d.last_error
    assert sorted(got) == sorted(results.sop_instance_uids)


def test_plain_delivery_to_a_tls_peer_is_a_transient_failure(
    tmp_path: Path,
    pki: Path,  # noqa: F811
) -> None:
    port = free_port()
    dest = {"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}
    settings = delivery_settings(tmp_path, destinations=[{**dest, "timeout_seconds": 3}])
    sessions = sessions_for(settings)
    results = make_results(tmp_path / "out")
    job_id = seed_job(settings, sessions, results)
    got: list[str] = []
    server = _tls_peer(port, pki, got)
    try:
        scheduler = DeliveryScheduler(settings, sessions)
        scheduler.enqueue(job_id)
        scheduler.run_due()
    finally:
        server.shutdown()
    with sessions() as s:
        d = s.scalars(select(Delivery)).one()
    assert d.status is DeliveryStatus.RETRYING and got == []
