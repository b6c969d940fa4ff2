"""A newcomer's start: ``sijnode serve`` on the SQLite default needs no set-up step.

A new SQLite audit is created and migrated by ``serve`` itself; a PostgreSQL database is
never migrated behind its administrator's back, and the error says which command to run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, inspect

from sijnode.db.migrate import current_revision, head_revision, prepare_embedded, upgrade
from tests.conftest import free_port


def _serve_env(tmp_path: Path, url: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": url,
            "SIJNODE_DATABASE__PSEUDONYM_SECRET": "test-secret",
            "SIJNODE_STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_NODE__PORT": str(port),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_METRICS__PORT": "0",
        }
    )
    return env


def _echo(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0x0000


def test_serve_creates_and_migrates_a_new_sqlite_audit(tmp_path: Path) -> None:
    db = tmp_path / "new" / "dir" / "audit.db"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sijnode.cli import main; main()", "serve"],
        env=_serve_env(tmp_path, f"sqlite:///{db}", port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        answered = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answered = _echo(port)
            except (OSError, RuntimeError):
                answered = False
            if answered:
                break
            time.sleep(0.5)
        assert answered, "serve did not answer C-ECHO on a new SQLite audit"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    engine = create_engine(f"sqlite:///{db}")
    try:
        assert current_revision(engine) == head_revision()
        assert "studies" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_serve_refuses_an_empty_postgresql_and_names_the_command(
    tmp_path: Path, pg_url: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from sijnode.cli import main; main()", "serve"],
        env=_serve_env(tmp_path, pg_url, free_port()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "run `sijnode db upgrade`" in proc.stdout + proc.stderr
    engine = create_engine(pg_url)
    try:
        assert current_revision(engine) is None, "serve must not migrate PostgreSQL itself"
    finally:
        engine.dispose()


def test_prepare_embedded_leaves_existing_and_server_databases_alone(
    tmp_path: Path, pg_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    assert prepare_embedded(url) is None
    engine = create_engine(url)
    try:
        assert current_revision(engine) == "0001"
    finally:
        engine.dispose()
    assert prepare_embedded(pg_url) is None
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert prepare_embedded(fresh) == head_revision()
