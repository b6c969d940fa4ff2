"""The README's console blocks run as written, against a scratch directory.

Every ``$ command`` line of every ```` ```console ```` block in README.md is executed in
order from the repository root, with the node's state (audit, spool, data directory) in a
temporary directory, ``/tmp/`` paths moved under it and the DICOM port 11112 replaced by a
free port. A command that starts the node (``scripts/serve``, ``sijnode serve``) runs in
the background until the test ends; the next command starts once the node answers C-ECHO.

A block that cannot run inside the test suite says so on the line before it, with a
reason: ``<!-- readme-test: skip (reason) -->`` (for example ``scripts/test`` itself, or
Docker, which these machines do not have). The test fails if a skip has no reason.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
SERVE = re.compile(r"(^|\s|/)(scripts/serve|sijnode serve)(\s|$)")


@dataclass(frozen=True)
class Block:
    line: int
    commands: tuple[str, ...]
    skip_reason: str | None


def console_blocks(text: str) -> list[Block]:
    """The console blocks of a Markdown text, with their commands and skip markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```console":
            start = i
            previous = next((x for x in reversed(lines[:i]) if x.strip()), "")
            marker = SKIP.search(previous)
            commands = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                if lines[i].startswith("$ "):
                    commands.append(lines[i][2:].strip())
                i += 1
            reason = None
            if marker:
                reason = (marker.group("reason") or "").strip()
            blocks.append(Block(start + 1, tuple(commands), reason))
        i += 1
    return blocks


def _echo(port: int) -> bool:
    ae = AE(ae_title="READMETEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 2
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    except (OSError, RuntimeError):
        return False
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_every_console_block_is_run_or_says_why_not() -> None:
    blocks = console_blocks(README.read_text())
    assert blocks, "README.md has no console blocks"
    for block in blocks:
        assert block.commands, f"README.md:{block.line}: a console block without a $ command"
        if block.skip_reason is not None:
            assert block.skip_reason, f"README.md:{block.line}: readme-test skip needs a reason"


@pytest.mark.slow
def test_readme_console_blocks_run(
    tmp_path: Path, background: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ)
    env.update(
        {
            "SIJNODE_DATABASE__URL": f"sqlite:///{scratch / 'sijnode.db'}",
            "SIJNODE_DATABASE__PSEUDONYM_SECRET": "readme-test",
            "SIJNODE_STORAGE__SPOOL_DIR": str(scratch / "spool"),
            "SIJNODE_STORAGE__MIN_FREE_MB": "1",
            "SIJNODE_DATA_DIR": str(scratch / "var"),
            "SIJNODE_NODE__PORT": str(port),
            "SIJNODE_NODE__BIND_ADDRESS": "127.0.0.1",
            "SIJNODE_METRICS__PORT": "0",
        }
    )
    ran = 0
    for block in console_blocks(README.read_text()):
        if block.skip_reason is not None:
            continue
        for command in block.commands:
            command = command.replace("/tmp/", f"{scratch}/").replace("11112", str(port))
            where = f"README.md:{block.line}: `{command}`"
            if SERVE.search(command):
                log = (scratch / f"serve-{len(background)}.log").open("wb")
                proc = subprocess.Popen(
                    ["bash", "-c", f"exec {command}"],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                background.append(proc)
                deadline = time.monotonic() + 600  # the first scripts/serve may bootstrap
                while not _echo(port):
                    assert proc.poll() is None, f"{where} exited with {proc.returncode}"
                    assert time.monotonic() < deadline, f"{where} never answered C-ECHO"
                    time.sleep(0.5)
            else:
                result = subprocess.run(
                    ["bash", "-c", command],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                assert result.returncode == 0, (
                    f"{where} failed with {result.returncode}:\n{result.stdout}\n{result.stderr}"
                )
            ran += 1
    assert ran >= 3, f"only {ran} README commands ran"


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def test_relative_links_of_readme_and_docs_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file of the repository (and,
    with ``#anchor``, a heading of that file)."""
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for match in LINK.finditer(page.read_text()):
            target = match.group("target")
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
                continue
            if anchor and file.suffix == ".md":
                headings = {
                    re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
                    for h in file.read_text().splitlines()
                    if h.startswith("#")
                }
                if anchor not in headings:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
