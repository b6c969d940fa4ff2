"""TLS on the listener (PS3.15 Annex B.1), with and without client certificates."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from sijnode.daemon.scp import SUCCESS
from tests.conftest import require_tool
from tests.nodes import node_settings, receive_mode, running_node, send  # noqa: F401 - receive_mode: a fixture
from tests.studies import make_study

# every test here runs in both receive modes (node.receive_mode)
pytestmark = pytest.mark.usefixtures("receive_mode")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def _client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def _tls_settings(tmp_path: Path, pki: Path, mutual: bool):
    return node_settings(
        tmp_path,
        node={
            "tls": {
                "enabled": True,
                "cert_file": str(pki / "server.pem"),
                "key_file": str(pki / "server.key"),
                "ca_file": str(pki / "ca.pem"),
                "require_client_cert": mutual,
            }
        },
    )


def _echo(port: int, ctx: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="SIJNODE", tls_args=(ctx, "127.0.0.1") if ctx else None
    )
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return bool(ok)


def test_tls_accepted_and_plain_refused(tmp_path: Path, pki: Path) -> None:
    with running_node(_tls_settings(tmp_path, pki, mutual=False)) as node:
        assert _echo(node.scp.port, _client_context(pki, with_cert=False))
        assert (
            send(make_study("tls", n=2), node.scp.port, ssl_context=_client_context(pki, False))
            == [SUCCESS] * 2
        )
        assert not _echo(node.scp.port, None), "a plain association must be refused"


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    with running_node(_tls_settings(tmp_path, pki, mutual=True)) as node:
        assert _echo(node.scp.port, _client_context(pki, with_cert=True))
        assert not _echo(node.scp.port, _client_context(pki, with_cert=False))


def test_dcmtk_echoscu_over_tls(tmp_path: Path, pki: Path) -> None:
    echoscu = require_tool("echoscu")
    with running_node(_tls_settings(tmp_path, pki, mutual=True)) as node:
        proc = subprocess.run(
            [
                echoscu,
                "+tls",
                str(pki / "client.key"),
                str(pki / "client.pem"),
                "+cf",
                str(pki / "ca.pem"),
                "-aec",
                "SIJNODE",
                "127.0.0.1",
                str(node.scp.port),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr


def test_failed_handshakes_are_recorded_as_refused_associations(tmp_path: Path, pki: Path) -> None:
    """A plain association and a client without a certificate (mutual TLS): a log line
    and a refused association with the reason, each; the node keeps serving."""
    from sqlalchemy import select

    from sijnode.db.schema import Association, AssociationOutcome, Event, EventType
    from tests.nodes import count, wait_for

    with running_node(_tls_settings(tmp_path, pki, mutual=True)) as node:
        assert not _echo(node.scp.port, None)
        assert not _echo(node.scp.port, _client_context(pki, with_cert=False))

        def refused() -> list[Association]:
            with node.sessions() as s:
                return list(
                    s.scalars(
                        select(Association).where(
                            Association.outcome == AssociationOutcome.REJECTED
                        )
                    ).all()
                )

        rows = wait_for(lambda: len(refused()) == 2 and refused())
        assert all(r.tls and r.peer_address == "127.0.0.1" for r in rows)
        assert all((r.reject_reason or "").startswith("TLS handshake failed: ") for r in rows)
        assert count(node, Event, Event.type == EventType.ASSOCIATION_REJECTED) == 2
        assert _echo(node.scp.port, _client_context(pki, with_cert=True))
