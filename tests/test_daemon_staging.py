"""The receive fast path: data sets staged in the spool, answered on the reader thread."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import evt
from sqlalchemy import event, insert, select, text

from sijnode.daemon.header import read_header
from sijnode.daemon.keys import read_keys
from sijnode.daemon.node import Node
from sijnode.daemon.scp import SUCCESS
from sijnode.daemon.spool import Spool
from sijnode.daemon.staging import StagedFile, open_staged
from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.migrate import upgrade
from sijnode.db.prepared import PreparedStatement
from sijnode.db.schema import Event, EventType, Instance, Study, StudyState
from sijnode.errors import AuditError, DiskFullError, InvalidInstanceError
from sijnode.synth import generate_ct_study, generate_mr_study
from tests.conftest import require_tool
from tests.nodes import count, node_settings, running_node, send, wait_for
from tests.studies import encode, make_series, make_study


@pytest.fixture
def helpers() -> Any:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown()


def test_staged_file_hashes_and_seals_what_was_written(tmp_path: Path, helpers: Any) -> None:
    spool = Spool(tmp_path / "spool", 0)
    staged = open_staged(spool, helpers)
    chunks = [os.urandom(1000), os.urandom(70_000), b"tail"]
    for chunk in chunks:
        assert staged.write(chunk) == len(chunk)
    staged.seal()
    assert staged.digest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert staged.size == sum(map(len, chunks))
    assert staged.read() == b"".join(chunks)
    assert staged.head == b"".join(chunks)[: len(staged.head)]
    staged.discard()
    assert not staged.path.exists()
    staged.close()  # pynetdicom closes again after the handler: harmless


def test_staged_file_keeps_a_write_error_instead_of_raising(tmp_path: Path, helpers: Any) -> None:
    spool = Spool(tmp_path / "spool", 0)
    staged = open_staged(spool, helpers)
    os.close(staged._fd)  # type: ignore[arg-type]  # every later write fails with EBADF
    staged._fd = os.open(os.devnull, os.O_RDONLY)
    assert staged.write(b"x" * 20_000) == 20_000  # pynetdicom must not see an exception
    assert staged.error is not None
    with pytest.raises(type(staged.error)):
        staged.seal()
    staged.discard()
    assert not staged.path.exists()


def test_staged_file_below_minimum_free_space_takes_no_bytes(tmp_path: Path, helpers: Any) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=2**62)
    staged = open_staged(spool, helpers)
    assert isinstance(staged.error, DiskFullError)
    staged.write(b"x" * 100)
    assert staged.size == 0 and not staged.path.exists()
    with pytest.raises(DiskFullError):
        staged.digest()


@pytest.mark.parametrize("make", [generate_ct_study, generate_mr_study])
def test_read_keys_agrees_with_the_full_header(make: Any) -> None:
    study = make(seed=3, subject_index=1, positive=True, side="left", n_slices=6)
    for ds in study.datasets:
        data = encode(ds)
        keys, full = read_keys(data), read_header(data)
        for name in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_instance_uid",
            "sop_class_uid",
            "transfer_syntax_uid",
            "instance_number",
            "slice_position",
            "images_in_acquisition",
            "series_related_instances",
        ):
            assert getattr(keys, name) == getattr(full, name), name


def test_read_keys_refuses_what_read_header_refuses() -> None:
    ds = make_study("keys-bad", n=1)[0]
    ds.SeriesInstanceUID = "1.2.03.x"
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        read_keys(encode(ds))
    del ds.SeriesInstanceUID
    with pytest.raises(InvalidInstanceError, match="SeriesInstanceUID"):
        read_keys(encode(ds))
    with pytest.raises(InvalidInstanceError):
        read_keys(b"\0" * 128 + b"DICM" + b"garbage" * 10)


def test_prepared_statement_writes_what_the_orm_writes(db_url: str) -> None:
    """Dates, enums and JSON through the raw cursor read back as the ORM wrote them."""
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    at = datetime(2026, 11, 24, 10, 30, 15, 123456, tzinfo=UTC)
    statement = PreparedStatement(
        insert(Event), engine.dialect, ("type", "study_id", "association_id", "detail", "at")
    )
    with transaction(sessions) as session:
        statement.execute(
            session.connection(),
            {
                "type": EventType.INSTANCE_CONFLICT,
                "study_id": None,
                "association_id": None,
                "detail": {"size": 3, "uid": "1.2.3"},
                "at": at,
            },
        )
        session.add(
            Event(type=EventType.INSTANCE_CONFLICT, detail={"size": 3, "uid": "1.2.3"}, at=at)
        )
    with sessions() as session:
        raw, orm = session.scalars(select(Event).order_by(Event.id)).all()
        assert (raw.type, raw.detail) == (orm.type, orm.detail)
        assert raw.at.replace(tzinfo=UTC) == orm.at.replace(tzinfo=UTC) == at
        stored = session.execute(text("select at, type from events order by id")).all()
        assert stored[0] == stored[1]
    with pytest.raises(AuditError, match="missing"):
        with transaction(sessions) as session:
            statement.execute(session.connection(), {"type": EventType.RECOVERY})
    engine.dispose()


def test_each_c_store_is_answered_once_on_the_reader_thread(tmp_path: Path) -> None:
    """The association thread never sees an answered C-STORE; the SCU gets one status each."""
    settings = node_settings(tmp_path)
    upgrade(settings.database.url)
    node = Node(settings)
    handled: list[int] = []
    fallback = node.scp.handle_store

    def counting(event: evt.Event) -> int:
        handled.append(1)
        return fallback(event)

    node.scp.handle_store = counting  # type: ignore[method-assign]
    node.start()
    try:
        study = make_study("reader-thread", n=5)
        assert send(study, node.scp.port) == [SUCCESS] * 5
        assert count(node, Instance) == 5
        assert handled == []
        # the association row exists before the first C-STORE can arrive
        assert count(node, Instance, Instance.association_id.is_(None)) == 0
    finally:
        node.stop()


def test_a_failed_reader_thread_answer_falls_back_to_the_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If sending the response fails on the reader thread, the handler answers once."""
    from sijnode.daemon.dimse import fastpath

    settings = node_settings(tmp_path)
    upgrade(settings.database.url)
    node = Node(settings)
    handled: list[int] = []
    fallback = node.scp.handle_store
    failures = iter([True, False, False])
    answer = fastpath.answer

    def counting(event: evt.Event) -> int:
        handled.append(1)
        return fallback(event)

    def flaky(event: Any, status: int) -> bool:
        if next(failures, False):
            raise RuntimeError("simulated failure before the response")
        return answer(event, status)

    node.scp.handle_store = counting  # type: ignore[method-assign]
    monkeypatch.setattr(fastpath, "answer", flaky)
    node.start()
    try:
        study = make_study("fallback", n=3)
        assert send(study, node.scp.port) == [SUCCESS] * 3
        assert handled == [1]  # only the first, whose reader-thread answer failed
        assert count(node, Instance) == 3  # ingested once, not twice
        assert node.metrics.instances.labels(outcome="stored")._value.get() == 3
    finally:
        node.stop()


def test_recovery_removes_rows_of_unacknowledged_instances(tmp_path: Path) -> None:
    """A row committed whose rename did not survive (power loss) is removed at start-up."""
    # the study must still be receiving at the restart (a complete one keeps its rows)
    settings = node_settings(
        tmp_path, completion={"quiet_seconds": 600, "content_quiet_seconds": 600}
    )
    study = make_study("unacked", n=3)
    with running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 3
        with node.sessions() as s:
            victim = s.scalars(select(Instance).order_by(Instance.id)).first()
            assert victim is not None
        node.spool.path(victim.spool_path).unlink()
    with running_node(settings, migrate=False) as node:
        with node.sessions() as s:
            paths = set(s.scalars(select(Instance.spool_path)))
            assert victim.spool_path not in paths and len(paths) == 2
            events = s.scalars(select(Event).where(Event.type == EventType.RECOVERY)).all()
            assert any(e.detail.get("unacknowledged_rows_removed") == 1 for e in events)


def test_recovery_keeps_rows_of_studies_already_complete(tmp_path: Path) -> None:
    """Files missing from a dispatched study are not taken for unacknowledged ones."""
    settings = node_settings(tmp_path)
    study = make_study("kept", n=2)
    uid = str(study[0].StudyInstanceUID)
    with running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 2

        def state() -> StudyState | None:
            with node.sessions() as s:
                return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))

        wait_for(lambda: state() == StudyState.DISPATCHED)
        with node.sessions() as s:
            victim = s.scalars(select(Instance)).first()
            assert victim is not None
        node.spool.path(victim.spool_path).unlink()
    with running_node(settings, migrate=False) as node:
        assert count(node, Instance) == 2


@pytest.mark.parametrize("mode,expected", [("normal", 1), ("spool", 2), ("full", 2)])
def test_sqlite_synchronous_setting_reaches_the_connection(
    tmp_path: Path, mode: str, expected: int
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}", sqlite_synchronous=mode)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == expected
    engine.dispose()


@pytest.mark.parametrize("mode,main,fresh", [("normal", 1, 1), ("spool", 2, 1), ("full", 2, 2)])
def test_the_node_uses_the_configured_sqlite_synchronous(
    tmp_path: Path, mode: str, main: int, fresh: int
) -> None:
    """``spool`` (the default): FULL, but the hot path's one-row commits NORMAL.

    Counted on the engines themselves: of 5 instances of a new series, the first takes the
    long way (study and series rows, FULL); the other 4 commit through the hot path's
    sessions, and nothing else does.
    """
    settings = node_settings(
        tmp_path / mode,
        database={"sqlite_synchronous": mode},
        completion={"quiet_seconds": 600, "content_quiet_seconds": 600},
    )
    with running_node(settings) as node:
        with node.sessions() as s:
            assert s.execute(text("PRAGMA synchronous")).scalar() == main
        with node.ingestor.fresh_sessions() as s:
            assert s.execute(text("PRAGMA synchronous")).scalar() == fresh
        assert (node.ingestor.fresh_sessions is node.sessions) == (mode != "spool")
        if mode != "spool":
            return
        commits: list[str] = []
        for name, factory in (("main", node.sessions), ("fresh", node.ingestor.fresh_sessions)):
            engine = factory.kw["bind"]
            event.listen(engine, "commit", lambda _conn, name=name: commits.append(name))
        assert send(make_study("spoolmode", n=5), node.scp.port) == [SUCCESS] * 5
        assert commits.count("fresh") == 4
        assert count(node, Instance) == 5  # (read through the main engine)


def test_a_power_loss_after_the_hot_paths_normal_commits_loses_no_instance(
    tmp_path: Path,
) -> None:
    """The hot path's rows commit with ``synchronous=NORMAL`` (``spool`` mode): after a
    power loss the database may lack the most recent of them, never their files, which
    start-up recovery records again (docs/receiving.md, "Durability of the audit row").

    Simulated on the database files: their state after the study's first instance (a
    FULL commit) is put back after the other five were acknowledged, which loses more
    than a power loss could (the second instance takes the long way, FULL, after the
    restart emptied the caches).
    """
    quiet = {"quiet_seconds": 600, "content_quiet_seconds": 600}
    settings = node_settings(tmp_path, completion=quiet)
    assert settings.database.sqlite_synchronous == "spool"  # the default
    db = Path(settings.database.url.removeprefix("sqlite:///"))
    study = make_study("powerloss", n=6)
    with running_node(settings) as node:
        assert send(study[:1], node.scp.port) == [SUCCESS]
    saved = {p.name: p.read_bytes() for p in db.parent.glob(db.name + "*")}
    with running_node(settings, migrate=False) as node:
        assert send(study[1:], node.scp.port) == [SUCCESS] * 5
        with node.sessions() as s:
            acknowledged = {
                i.sop_instance_uid: (i.spool_path, i.sha256) for i in s.scalars(select(Instance))
            }
    assert len(acknowledged) == 6
    for p in db.parent.glob(db.name + "*"):
        p.unlink()
    for name, data in saved.items():
        (db.parent / name).write_bytes(data)
    engine = make_engine(settings.database.url)
    with make_sessionmaker(engine)() as s:  # the database as the power loss left it
        assert len(s.scalars(select(Instance)).all()) == 1
    engine.dispose()
    with running_node(node_settings(tmp_path), migrate=False) as node:
        with node.sessions() as s:
            rows = {
                i.sop_instance_uid: (i.spool_path, i.sha256) for i in s.scalars(select(Instance))
            }
            events = s.scalars(select(Event).where(Event.type == EventType.RECOVERY)).all()
        assert rows == acknowledged
        for spool_path, sha in rows.values():
            assert hashlib.sha256(node.spool.path(spool_path).read_bytes()).hexdigest() == sha
        assert any(e.detail.get("orphans_recorded") == 5 for e in events)

        def state() -> StudyState | None:
            with node.sessions() as s:
                return s.scalar(select(Study.state))

        wait_for(lambda: state() == StudyState.DISPATCHED)


def test_a_cut_off_transfer_leaves_no_temporary_file(tmp_path: Path) -> None:
    """storescu killed in the middle of a data set: the partial file goes, the node stays."""
    require_tool("storescu")
    big = make_series("cutoff", "1.2.826.0.1.3680043.8.498.777", 1, 1, rows=4096)[0]
    path = tmp_path / "big.dcm"
    path.write_bytes(encode(big))  # 32 MB: more than the socket buffers hold
    settings = node_settings(tmp_path)
    midway = threading.Event()
    original = StagedFile.write

    def slow(self: StagedFile, data: Any) -> int:
        n = original(self, data)
        if self.size > 100_000 and not midway.is_set():
            midway.set()
            time.sleep(1.0)  # the sender is killed meanwhile
        return n

    with running_node(settings) as node:
        StagedFile.write = slow  # type: ignore[method-assign]
        try:
            proc = subprocess.Popen(
                ["storescu", "-aec", "SIJNODE", "127.0.0.1", str(node.scp.port), str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            assert midway.wait(30), "the transfer never started"
            proc.kill()
            proc.wait(10)
        finally:
            StagedFile.write = original  # type: ignore[method-assign]
        tmp = tmp_path / "spool" / ".tmp"
        wait_for(lambda: list(tmp.iterdir()) == [], timeout=30)
        assert count(node, Instance) == 0
        assert send(make_study("after-cutoff", n=1), node.scp.port) == [SUCCESS]


def test_c_store_response_pdu_decodes_as_pynetdicom_expects() -> None:
    """The hand-encoded C-STORE-RSP round-trips through pynetdicom's own decoder."""
    from pynetdicom.dimse_messages import DIMSEMessage
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    from sijnode.daemon.dimse.fastpath import encode_c_store_rsp

    for sop_uid, status in (("1.2.3.4", 0x0000), ("1.2.840.10008.55", 0xA700)):
        pdu_bytes = encode_c_store_rsp(7, 4242, "1.2.840.10008.5.1.4.1.1.2", sop_uid, status)
        pdu = P_DATA_TF()
        pdu.decode(pdu_bytes)
        assert pdu.encode() == pdu_bytes
        message = DIMSEMessage()
        assert message.decode_msg(pdu.to_primitive())
        assert message.context_id == 7
        primitive = message.message_to_primitive()
        assert isinstance(primitive, C_STORE)
        assert primitive.MessageIDBeingRespondedTo == 4242
        assert primitive.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert primitive.AffectedSOPInstanceUID == sop_uid
        assert primitive.Status == status


@pytest.mark.parametrize(
    "sop_class,sop_instance,syntax",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.826.0.1.3680043.8.498.12345", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.7", "2.25.1", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_meta_is_byte_for_byte_what_pydicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from sijnode.daemon import filemeta

    reference = DicomBytesIO()
    write_file_meta_info(
        reference,
        create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    fast = DicomBytesIO()
    filemeta.write_file_meta_info(
        fast,
        filemeta.create_file_meta(
            sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax
        ),
    )
    assert fast.getvalue() == reference.getvalue()


def _corpus_instances() -> list[Path]:
    """pydicom's bundled test files (the local ones; nothing is downloaded)."""
    import pydicom.data

    root = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_key_scan_agrees_with_pydicom_on_its_test_corpus() -> None:
    """The header walk and pydicom read the same keys, or the walk hands over to pydicom."""
    from sijnode.daemon import keys

    walked = 0
    for path in _corpus_instances():
        data = path.read_bytes()
        scanned = keys._scan(data)
        if scanned is None:
            continue
        try:
            reference, syntax = keys._read_with_pydicom(data)
        except InvalidInstanceError:
            continue
        values, scanned_syntax = scanned
        assert scanned_syntax == syntax, path.name
        for tag in keys._KEY_TAGS:
            assert keys._text(values, tag) == keys._text(reference, tag), (path.name, hex(tag))
        walked += 1
    assert walked >= 20  # the walk covers most of the corpus, not a handful


@pytest.mark.parametrize("make", [generate_ct_study, generate_mr_study])
def test_key_scan_reads_the_synthetic_studies_without_pydicom(make: Any) -> None:
    from sijnode.daemon import keys

    study = make(seed=5, subject_index=1, positive=False, side="none", n_slices=4)
    for ds in study.datasets:
        assert keys._scan(encode(ds)) is not None


def test_optimistic_path_falls_back_for_duplicates_and_conflicts(
    tmp_path: Path, db_url: str
) -> None:
    """The one-round-trip path stores new instances; re-sends and conflicts take the long
    way with the same outcomes, on SQLite and on PostgreSQL (pipeline mode)."""
    study = make_study("optimistic", n=4)
    other = make_study("optimistic", n=4)
    other[2].SeriesDescription = "changed"  # same SOP Instance UID, different bytes
    settings = node_settings(tmp_path, db_url=db_url, completion={"quiet_seconds": 600})
    with running_node(settings) as node:
        assert send(study, node.scp.port) == [SUCCESS] * 4
        assert send(study, node.scp.port) == [SUCCESS] * 4
        assert send(other[2:3], node.scp.port) == [SUCCESS]
        assert count(node, Instance) == 5
        assert count(node, Event, Event.type == EventType.INSTANCE_DUPLICATE) == 4
        assert count(node, Instance, Instance.conflict.is_(True)) == 2
        assert count(node, Instance, Instance.association_id.is_(None)) == 0


def test_the_writeback_call_is_looked_up_on_first_use_not_at_import() -> None:
    """Importing the staging module runs no ctypes library lookup (issue 8.5)."""
    import subprocess
    import sys

    code = (
        "import ctypes.util\n"
        "calls = []\n"
        "real = ctypes.util.find_library\n"
        "ctypes.util.find_library = lambda name: calls.append(name) or real(name)\n"
        "import sijnode.daemon.staging as staging\n"
        "assert calls == [], calls\n"
        "staging.start_writeback(0, 0, 0)\n"
        "assert calls == ['c'], calls\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
