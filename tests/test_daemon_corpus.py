"""pydicom's test corpus through the listener: real-world encodings kept byte-identical.

Every file in pydicom's test data that is a storage instance is sent as its raw bytes
(pynetdicom reads the file and sends the encoded dataset without decoding it). Files the
node cannot file into a study (no Study/Series/SOP Instance UID, bad UIDs, garbage) must
get a failure status; everything else must be stored byte for byte, and the node must
stay up throughout.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pydicom.data
import pynetdicom._config
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from sijnode.daemon.scp import CANNOT_UNDERSTAND, SUCCESS, accepted_transfer_syntaxes
from sijnode.db.schema import Instance
from sijnode.uids import is_valid_uid
from tests.nodes import node_settings, receive_mode, running_node  # noqa: F401 - receive_mode: a fixture
from tests.studies import dataset_part

STORAGE = {str(c.abstract_syntax) for c in StoragePresentationContexts}
#: Files pynetdicom itself cannot send (a client-side encoding error, before any PDU).
CLIENT_CANNOT_SEND = {"SC_rgb_jpeg.dcm"}

# every test here runs in both receive modes (node.receive_mode)
pytestmark = pytest.mark.usefixtures("receive_mode")


def corpus() -> list[tuple[Path, Dataset]]:
    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = dcmread(path, force=True, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, TypeError, EOFError):
            continue
        if str(ds.get("SOPClassUID", "")) in STORAGE and path.name not in CLIENT_CANNOT_SEND:
            out.append((path, ds))
    return out


def fileable(ds: Dataset) -> bool:
    """Whether the node can file this instance: valid Study, Series and SOP UIDs."""
    keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    return all(is_valid_uid(str(ds.get(k, ""))) for k in keys)


def _syntax(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:
        return str(ts)
    implicit, little = ds.original_encoding
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def test_corpus_received_byte_identical(tmp_path: Path, monkeypatch) -> None:
    # send files as their raw encoded bytes, without pydicom decoding and re-encoding
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    files = corpus()
    assert len(files) > 100, "pydicom's corpus should hold well over 100 storage instances"
    syntaxes = {_syntax(ds) for _, ds in files}
    # the corpus spans compressed, big-endian, implicit and deflated encodings
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"} <= syntaxes
    assert {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"} <= syntaxes
    assert syntaxes <= set(accepted_transfer_syntaxes())
    sent: dict[str, list[bytes]] = {}
    results: dict[str, int] = {}
    with running_node(node_settings(tmp_path)) as node:
        for path, ds in files:
            ae = AE(ae_title="CORPUS")
            ae.add_requested_context(ds.SOPClassUID, [_syntax(ds)])
            assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
            assert assoc.is_established, path.name
            has_meta = path.read_bytes()[128:132] == b"DICM"
            try:
                if has_meta:
                    rsp = assoc.send_c_store(path)  # raw bytes, no decoding
                    expected = dataset_part(path.read_bytes())
                else:
                    full = dcmread(path, force=True)
                    full.file_meta = FileMetaDataset()
                    full.file_meta.TransferSyntaxUID = _syntax(ds)
                    rsp = assoc.send_c_store(full)
                    expected = path.read_bytes()
            finally:
                assoc.release()
            results[path.name] = int(rsp.Status)
            if fileable(ds):
                sent.setdefault(str(ds.SOPInstanceUID), []).append(expected)
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        assert assoc.send_c_echo().Status == 0, "node must stay up"
        assoc.release()
        with node.sessions() as s:
            rows = s.scalars(select(Instance)).all()
        stored: dict[str, list[bytes]] = {}
        for row in rows:
            stored.setdefault(row.sop_instance_uid, []).append(
                dataset_part(node.spool.read(row.spool_path))
            )
    for path, ds in files:
        want = SUCCESS if fileable(ds) else CANNOT_UNDERSTAND
        assert results[path.name] == want, f"{path.name}: 0x{results[path.name]:04X}"
    assert any(not fileable(ds) for _, ds in files), "corpus should include unfileable files"
    # byte identity: every distinct encoding sent under a UID is in the spool, exactly
    for uid, blobs in sent.items():
        assert set(stored[uid]) == set(blobs), uid


def test_garbage_after_valid_meta_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds = Dataset()
    ds.file_meta = meta
    ds.save_as(buf, enforce_file_format=True)
    path = tmp_path / "garbage.dcm"
    path.write_bytes(buf.getvalue() + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00garbage" * 50)
    with running_node(node_settings(tmp_path)) as node:
        ae = AE()
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="SIJNODE")
        rsp = assoc.send_c_store(path)
        assert int(rsp.Status) == CANNOT_UNDERSTAND
        # the same association still works
        good = dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        assert int(assoc.send_c_store(good).Status) == SUCCESS
        assoc.release()
        assert len(node.spool.iter_files()) == 1
