"""Flush micro-benchmark: what durability costs per instance on this disk (issue 15).

Writes ``--files`` files of ``--size`` KiB (random bytes) into a temporary directory beside
the spool's disk (``--dir``, default: the system's temporary directory) and times, per
file, the flushes that Success needs after the bytes are written, in the orders below
(medians and p90 in ms):

- ``file+rename+dir``: the node's order: ``fsync`` the file, rename it into its
  directory, ``fsync`` the directory (docs/receiving.md);
- ``rename+file+dir``: rename first, then both ``fsync``\\ s;
- ``file+rename``: without the directory ``fsync`` (not durable: the lower bound).

The orders take turns round by round, with a ``sync`` before each.

    .venv/bin/python bench/flush.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sijnode.daemon.spool import fsync_directory


def _node_order(fd: int, tmp: Path, final: Path) -> None:
    os.fsync(fd)
    os.rename(tmp, final)
    fsync_directory(final.parent)


def _rename_first(fd: int, tmp: Path, final: Path) -> None:
    os.rename(tmp, final)
    os.fsync(fd)
    fsync_directory(final.parent)


def _no_dir(fd: int, tmp: Path, final: Path) -> None:
    os.fsync(fd)
    os.rename(tmp, final)


ORDERS: dict[str, Callable[[int, Path, Path], None]] = {
    "file+rename+dir": _node_order,
    "rename+file+dir": _rename_first,
    "file+rename": _no_dir,
}


def one_round(root: Path, name: str, files: int, data: bytes) -> list[float]:
    """Per-file flush milliseconds of one order."""
    staging, final = root / name / "tmp", root / name / "final"
    staging.mkdir(parents=True)
    final.mkdir()
    flush = ORDERS[name]
    times = []
    for i in range(files):
        tmp, dest = staging / f"{i}.part", final / f"{i}.dcm"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
            t0 = time.perf_counter()
            flush(fd, tmp, dest)
            times.append((time.perf_counter() - t0) * 1000)
        finally:
            os.close(fd)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="KiB per file")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    data = os.urandom(args.size * 1024)
    results: dict[str, list[float]] = {name: [] for name in ORDERS}
    for round_ in range(args.rounds):
        for name in ORDERS:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
                os.sync()
                results[name] += one_round(Path(tmp_name) / str(round_), name, args.files, data)
    print(f"{args.files} files of {args.size} KiB, {args.rounds} rounds (ms per file)")
    for name, times in results.items():
        times.sort()
        print(
            f"{name:18s} median {statistics.median(times):5.2f}  "
            f"p90 {times[int(0.9 * (len(times) - 1))]:5.2f}"
        )


if __name__ == "__main__":
    main()
