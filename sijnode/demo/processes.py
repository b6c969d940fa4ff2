"""Processes the demo starts: each in its own process group, all stopped on exit.

Ctrl-C (SIGINT) and SIGTERM end the demo through :class:`KeyboardInterrupt`; the
``finally`` of :class:`Processes` then stops every group it started (SIGTERM, then
SIGKILL after a grace period), so nothing outlives the demo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

from sijnode.errors import SijnodeError


class DemoError(SijnodeError):
    """A stage of the demo failed or was not reached in time."""


def sijnode_command(config: Path | None, *args: str) -> list[str]:
    """``sijnode [--config FILE] ARGS``, run by this interpreter (so the same checkout)."""
    cmd = [sys.executable, "-c", "from sijnode.cli import main; main()"]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd + list(args)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Processes:
    """Started background processes; a context manager that stops them all."""

    def __init__(self, grace: float = 15.0) -> None:
        self.grace = grace
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._previous: object = None

    def __enter__(self) -> Processes:
        self._previous = signal.signal(signal.SIGTERM, _terminate)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            signal.signal(signal.SIGTERM, self._previous)  # type: ignore[arg-type]

    def start(self, name: str, cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in a new process group, output to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._procs.append((name, proc))
        return proc

    def run(self, name: str, cmd: Sequence[str], log: Path, timeout: float) -> None:
        """Run ``cmd`` to its end (stopped with the others on Ctrl-C); raise on failure."""
        proc = self.start(name, cmd, log)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self._stop(name, proc)
            raise DemoError(f"{name} did not finish within {timeout:g} s (log: {log})") from exc
        self._procs.remove((name, proc))
        if rc != 0:
            tail = log.read_text(errors="replace")[-1500:]
            raise DemoError(f"{name} failed with exit status {rc} (log: {log}):\n{tail}")

    def check_alive(self, name: str) -> None:
        """Raise if the process ``name`` has exited."""
        for n, proc in self._procs:
            if n == name and proc.poll() is not None:
                raise DemoError(f"{name} exited with status {proc.returncode}")

    def _stop(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Children of the group that outlived its leader.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        """Stop every started process, newest first."""
        while self._procs:
            name, proc = self._procs.pop()
            self._stop(name, proc)


def wait_until(what: str, check: object, timeout: float, interval: float = 0.3) -> None:
    """Poll ``check()`` until true; raise :class:`DemoError` naming ``what`` on timeout."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} not reached within {timeout:g} s")
        time.sleep(interval)
