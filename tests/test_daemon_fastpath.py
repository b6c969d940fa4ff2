"""The receive fast path is fenced in: the listener's AE only, self-checked, undone on stop.

Other AEs in the node's process (the result sender to come, a C-MOVE for priors, these
tests) must behave as stock pynetdicom while the listener runs on the fast path.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
from pathlib import Path

import pydicom.filewriter
import pynetdicom
import pynetdicom.dimse_messages
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from sijnode.daemon.dimse import fastpath
from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Instance
from tests.conftest import free_port, require_tool
from tests.nodes import count, node_settings, running_node, send, wait_for
from tests.studies import dataset_part, encode, make_study, write


def _stock() -> bool:
    """pynetdicom's receive module holds its own objects (nothing patched)."""
    module = pynetdicom.dimse_messages
    return (
        module.NamedTemporaryFile is tempfile.NamedTemporaryFile
        and module.write_file_meta_info is pydicom.filewriter.write_file_meta_info
    )


def _echo_ok(port: int, called: str) -> bool:
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return False
    assoc.release()
    return True


def test_a_sender_in_the_node_process_is_stock_pynetdicom(tmp_path: Path) -> None:
    """A pynetdicom SCU in the running node's process sends to DCMTK storescp, and a
    second, plain pynetdicom SCP in the same process receives as pynetdicom does."""
    storescp = require_tool("storescp")
    storescu = require_tool("storescu")
    outdir = tmp_path / "storescp"
    outdir.mkdir()
    scp_port = free_port()
    peer = subprocess.Popen(
        [storescp, "-aet", "PACS", "-od", str(outdir), str(scp_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _echo_ok(scp_port, "PACS"), timeout=30, interval=0.2)
        with running_node(node_settings(tmp_path)) as node:
            assert fastpath.installed() and node.scp.mode == "fast"
            # the listener still receives on the fast path meanwhile
            assert send(make_study("fenced-in", n=2), node.scp.port) == [SUCCESS] * 2
            assert count(node, Instance) == 2
            # 1. a result sender: a pynetdicom SCU to DCMTK's storescp
            results = make_study("result-sender", n=3)
            ae = AE(ae_title="SIJNODE")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", scp_port, ae_title="PACS")
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(ds).Status) for ds in results]
            assoc.release()
            assert statuses == [SUCCESS] * 3
            received = sorted(outdir.iterdir())
            assert len(received) == 3
            by_uid = {str(dcmread(p).SOPInstanceUID): p for p in received}
            for ds in results:
                stored = by_uid[str(ds.SOPInstanceUID)].read_bytes()
                assert dcmread(by_uid[str(ds.SOPInstanceUID)]).PixelData == ds.PixelData
                assert len(dataset_part(stored)) > 0
            # 2. another SCP in the process: pynetdicom's own receive and answer
            seen: list[tuple[object, str]] = []

            def handle(event: evt.Event) -> int:
                # stock pynetdicom: the data set in memory (no chunked receive), handled on
                # the association thread, answered by pynetdicom
                seen.append((event.dataset_path, str(event.dataset.SOPInstanceUID)))
                return 0x0000

            other = AE(ae_title="OTHER")
            for cx in StoragePresentationContexts:
                other.add_supported_context(cx.abstract_syntax)
            other_port = free_port()
            server = other.start_server(
                ("127.0.0.1", other_port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
            )
            try:
                files = write(make_study("other-scp", n=2), tmp_path / "other")
                proc = subprocess.run(
                    [storescu, "-aec", "OTHER", "127.0.0.1", str(other_port)]
                    + [str(f) for f in files],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert proc.returncode == 0, proc.stderr
            finally:
                server.shutdown()
            assert len(seen) == 2 and all(path is None for path, _ in seen)
            # and the listener's own instances went to its spool, not to the other SCP
            assert count(node, Instance) == 2
        assert not fastpath.installed() and _stock(), "stop must restore pynetdicom"
    finally:
        peer.terminate()
        peer.wait(10)


def test_an_unexpected_pynetdicom_gives_one_warning_and_the_standard_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A release the fast path was not written for: nothing is patched, the node
    receives in the standard mode, with one clear warning."""
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    settings = node_settings(tmp_path)
    assert settings.node.receive_mode == "fast"
    upgrade(settings.database.url)
    node = Node(settings)
    with caplog.at_level(logging.WARNING, logger="sijnode.daemon.dimse.fastpath"):
        node.start()
    try:
        warnings = [r for r in caplog.records if r.name == "sijnode.daemon.dimse.fastpath"]
        assert len(warnings) == 1
        assert "standard mode" in warnings[0].getMessage()
        problems = warnings[0].fields["problems"]  # type: ignore[attr-defined]
        assert problems == ["pynetdicom 3.1.0, expected 3.0.x"]
        assert node.scp.mode == "standard"
        assert not fastpath.installed() and _stock()
        study = make_study("fallback-mode", n=3)
        assert send(study, node.scp.port) == [SUCCESS] * 3
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
        by_uid = {r.sop_instance_uid: r.spool_path for r in rows}
        for ds in study:
            spooled = node.spool.read(by_uid[str(ds.SOPInstanceUID)])
            assert dataset_part(spooled) == dataset_part(encode(ds))
    finally:
        node.stop()


def test_the_self_check_passes_on_the_pinned_pynetdicom() -> None:
    assert fastpath.check() == []


def _quickack(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK)


def test_quick_ack_leaves_the_kernels_delayed_ack_mode() -> None:
    """On a real loopback connection: with TCP_QUICKACK 0 the kernel delays ACKs
    (interactive mode); quick_ack switches it back to acknowledging at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            assert _quickack(accepted) == 0
            fastpath.quick_ack(accepted)
            assert _quickack(accepted) == 1
            client.close()
            accepted.close()
            fastpath.quick_ack(accepted)  # a closed socket: nothing raised
    fastpath.quick_ack(None)


def test_the_reader_thread_re_arms_quick_ack_after_every_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each C-STORE answered on the reader thread is followed by TCP_QUICKACK on the
    association's own socket (the one connected to the sender), so a sender with Nagle's
    algorithm on never waits for a delayed ACK (docs/benchmarks.md, "Stream")."""
    calls: list[tuple[tuple[str, int], int]] = []
    original = fastpath.quick_ack

    def recording(sock: socket.socket | None) -> None:
        original(sock)
        assert sock is not None
        calls.append((sock.getpeername(), _quickack(sock)))

    monkeypatch.setattr(fastpath, "quick_ack", recording)
    settings = node_settings(tmp_path)
    with running_node(settings) as node:
        study = make_study("quick-ack", n=5)
        ae = AE(ae_title="TESTSCU")
        ae.requested_contexts = StoragePresentationContexts
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title=settings.node.ae_title)
        assert assoc.is_established
        local = assoc.dul.socket.socket.getsockname()
        statuses = [int(assoc.send_c_store(ds).Status) for ds in study]
        assoc.release()
    assert statuses == [SUCCESS] * 5
    assert [peer for peer, _ in calls] == [local] * 5, "one per answer, on this association"
    assert all(flag == 1 for _, flag in calls), calls
