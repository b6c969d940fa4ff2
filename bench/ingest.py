"""Ingest benchmark: sijnode's listener against a bare pynetdicom SCP, side by side.

DCMTK ``storescu`` sends 300 CT slices of 512×512 (int16) to each receiver in turn, on
one association and then on 4 concurrent associations (75 slices each). The bare SCP
only writes the received bytes to disk; sijnode stores them durably (fsync + rename),
records them in the audit database (SQLite and PostgreSQL) and assembles the study, in
both receive modes (``node.receive_mode``: ``fast`` and ``standard``). Rounds are
interleaved and the median is reported, because these machines are noisy; every timed
run starts after a ``sync``, so that one receiver's dirty pages are not written out
during the next one's fsyncs.

    .venv/bin/python bench/ingest.py --rounds 3 --out docs/benchmarks.md
    .venv/bin/python bench/ingest.py --rounds 1 --instances 8   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from sqlalchemy import create_engine, text

from sijnode.daemon.node import Node
from sijnode.daemon.scp import accepted_transfer_syntaxes
from sijnode.db.migrate import upgrade
from sijnode.settings import load_settings
from sijnode.uids import DEFAULT_UID_ROOT, make_uid

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BARE = "bare pynetdicom SCP"
DURABLE = "bare SCP, durable write"
FAST_SQLITE = "sijnode fast (SQLite)"
STANDARD_SQLITE = "sijnode standard (SQLite)"


def make_slices(folder: Path, n: int = 300, size: int = 512) -> list[Path]:
    """``n`` axial CT slices as files (one series), ~0.5 MB each."""
    folder.mkdir(parents=True, exist_ok=True)
    study = make_uid(DEFAULT_UID_ROOT, ["bench", "study"])
    series = make_uid(DEFAULT_UID_ROOT, ["bench", "series"])
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 1500, (size, size), dtype=np.int16)
    paths = []
    for i in range(1, n + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = make_uid(DEFAULT_UID_ROOT, ["bench", str(i)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "BENCH^PATIENT", "BENCH-1"
        ds.Modality, ds.BodyPartExamined, ds.ImageType = "CT", "PELVIS", ["ORIGINAL", "PRIMARY"]
        ds.SeriesNumber, ds.InstanceNumber, ds.ImagesInAcquisition = 1, i, n
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.roll(pixels, i, axis=0).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class Run:
    """One measured transfer."""

    receiver: str
    associations: int
    round: int
    seconds: float
    instances: int
    megabytes: float
    handler_ms: list[float]
    audit_ms: list[float]

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.handler_ms, 95))


def storescu(port: int, files: list[Path], associations: int) -> float:
    """Send ``files`` with DCMTK storescu over ``associations`` parallel processes."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "SIJNODE", "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


@contextmanager
def bare_scp(root: Path, durable: bool = False) -> Iterator[tuple[int, list[float], list[float]]]:
    """A minimal pynetdicom SCP that writes the raw bytes (``durable``: atomically, fsynced)."""
    times: list[float] = []
    root.mkdir(parents=True, exist_ok=True)

    def handle(event: evt.Event) -> int:
        t0 = time.perf_counter()
        data = event.encoded_dataset()
        name = f"{event.request.AffectedSOPInstanceUID}.dcm"
        if durable:
            # the same atomic write sijnode must do: temporary file, fsync, rename, dir fsync
            tmp = root / f".{name}.part"
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, root / name)
            fd = os.open(root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        else:
            (root / name).write_bytes(data)
        times.append((time.perf_counter() - t0) * 1000)
        return 0

    # pynetdicom's defaults (a stopped sijnode listener leaves nothing of its own behind)
    ae = AE(ae_title="SIJNODE")
    ae.maximum_pdu_size = 0
    syntaxes = accepted_transfer_syntaxes()
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    try:
        yield int(server.server_address[1]), times, []
    finally:
        server.shutdown()


@contextmanager
def sijnode_scp(
    root: Path, db_url: str, sqlite_synchronous: str = "spool", mode: str = "fast"
) -> Iterator[tuple[int, list[float], list[float]]]:
    """The real node (embedded worker) in receive ``mode``, with its C-STORE handling
    timed."""
    upgrade(db_url)
    settings = load_settings(
        overrides={
            "database": {"url": db_url, "sqlite_synchronous": sqlite_synchronous},
            "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 100},
            "node": {
                "port": _free_port(),
                "bind_address": "127.0.0.1",
                "max_associations": 8,
                "receive_mode": mode,
            },
            "metrics": {"port": 0},
            "completion": {"quiet_seconds": 600, "content_quiet_seconds": 600},
        }
    )
    node = Node(settings)
    times: list[float] = []
    # fast: ingested and answered on the reader thread as soon as the data set is in;
    # standard: pynetdicom's C-STORE handler on the association thread
    hook = "_on_dimse_received" if mode == "fast" else "handle_store"
    handler = getattr(node.scp, hook)

    def timed(event: evt.Event) -> Any:
        t0 = time.perf_counter()
        result = handler(event)
        times.append((time.perf_counter() - t0) * 1000)
        return result

    setattr(node.scp, hook, timed)
    audit: list[float] = []

    def timing(record: Callable[..., Any]) -> Callable[..., Any]:
        def timed_record(*args: Any, **kwargs: Any) -> Any:
            # the audit statements of one instance (their commit overlaps a flush)
            t0 = time.perf_counter()
            result = record(*args, **kwargs)
            if result is not None:  # (None: not the hot path, the long way follows)
                audit.append((time.perf_counter() - t0) * 1000)
            return result

        return timed_record

    # the hot path's one row, and the long way's rows (sijnode.daemon.ingest)
    rows = node.ingestor.rows
    rows.record_fresh = timing(rows.record_fresh)  # type: ignore[method-assign]
    node.ingestor._record = timing(node.ingestor._record)  # type: ignore[method-assign]
    node.start()
    if node.scp.mode != mode:
        node.stop()
        raise RuntimeError(f"sijnode runs in {node.scp.mode} mode, not {mode}: see its log")
    try:
        yield node.scp.port, times, audit
    finally:
        node.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fresh_pg_schema(name: str) -> str:
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'drop schema if exists "{name}" cascade'))
        conn.execute(text(f'create schema "{name}"'))
    engine.dispose()
    return f"{PG_URL}?options=-csearch_path%3D{name}"


def _drop_bench_schemas() -> None:
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        names = conn.execute(
            text("select nspname from pg_namespace where nspname like 'bench\\_%'")
        ).scalars()
        for name in list(names):
            conn.execute(text(f'drop schema "{name}" cascade'))
    engine.dispose()


def measure(
    name: str,
    round_: int,
    receiver: Callable[[Path], object],
    files: list[Path],
    associations: int,
    workdir: Path,
) -> Run:
    os.sync()  # the previous receiver's dirty pages are not this one's fsyncs' work
    with receiver(workdir) as (port, times, audit):  # type: ignore[attr-defined]
        seconds = storescu(port, files, associations)
        time.sleep(0.2)
        instances = len(times)
    size = sum(p.stat().st_size for p in files) / 1e6
    return Run(name, associations, round_, seconds, instances, size, list(times), list(audit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--instances", "--slices", dest="slices", type=int, default=300, help="slices sent"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = make_slices(tmp / "slices", args.slices)
        receivers: dict[str, Callable[[Path], object]] = {
            BARE: lambda d: bare_scp(d / "bare"),
            DURABLE: lambda d: bare_scp(d / "bare", durable=True),
            FAST_SQLITE: lambda d: sijnode_scp(d, f"sqlite:///{d / 'audit.db'}"),
            "sijnode fast (SQLite, synchronous=NORMAL)": lambda d: sijnode_scp(
                d, f"sqlite:///{d / 'audit.db'}", "normal"
            ),
            "sijnode fast (PostgreSQL)": lambda d: sijnode_scp(
                d, _fresh_pg_schema(f"bench_{d.name}")
            ),
            STANDARD_SQLITE: lambda d: sijnode_scp(
                d, f"sqlite:///{d / 'audit.db'}", mode="standard"
            ),
            "sijnode standard (PostgreSQL)": lambda d: sijnode_scp(
                d, _fresh_pg_schema(f"bench_{d.name}"), mode="standard"
            ),
        }
        runs: list[Run] = []
        counter = 0
        for associations in (1, 4):
            for round_ in range(args.rounds):
                for name, receiver in receivers.items():
                    counter += 1
                    workdir = tmp / f"r{counter}"
                    workdir.mkdir()
                    run = measure(name, round_, receiver, files, associations, workdir)
                    if run.instances != len(files):
                        raise RuntimeError(f"{name}: {run.instances} of {len(files)} received")
                    runs.append(run)
                    print(
                        f"{name:42s} assoc={associations} {run.per_second:7.1f} inst/s "
                        f"p95={run.p95_ms:6.2f} ms",
                        flush=True,
                    )
    _drop_bench_schemas()
    report = render(runs, args.slices)
    print(report)
    if args.out:
        write_section(args.out, report)


def render(runs: list[Run], slices: int) -> str:
    lines = [
        "## Ingest: sijnode against a bare pynetdicom SCP",
        "",
        f"DCMTK `storescu` sends {slices} CT slices of 512×512 int16 (about "
        f"{runs[0].megabytes:.0f} MB) to each receiver, in {max(r.round for r in runs) + 1} "
        "interleaved rounds. Rates are medians over the rounds; a ratio is taken within each "
        "round (the receivers run back to back there) and the median and the range of those "
        "per-round ratios are shown, because the machine's speed drifts between rounds. "
        "The bare SCP writes the raw bytes only (the reference of the target), with "
        "pynetdicom's defaults. The second bare SCP writes them as durably as sijnode must "
        "(temporary file, fsync, rename, directory fsync) and nothing else. sijnode "
        "receives each data set straight into its spool, hashes it, reads the header keys, "
        "fsyncs, renames and fsyncs the directory, commits the instance's audit rows, and "
        "only then answers (docs/receiving.md); it runs its completion loop meanwhile. "
        "*fast* is the default receive mode (the data set is written into the spool as it "
        "arrives and answered on the reader thread); *standard* uses only pynetdicom's "
        "public API (its chunked receive into the spool's temporary directory, its C-STORE "
        "handler and answer), with the same durability rules. "
        'sijnode runs with its defaults (SQLite `sqlite_synchronous = "spool"`: every '
        "commit fsynced but the hot path's one-row commits, whose content the fsynced spool "
        "file holds); `synchronous=NORMAL` (no commit fsynced) is the other "
        "`database.sqlite_synchronous` setting. Every run starts after a `sync`. "
        "Handling time is the C-STORE handler's time per instance (fast: from the last "
        "fragment until the reader thread is done, which includes making the next "
        "instance's file after the answer; standard: pynetdicom's EVT_C_STORE handler).",
        "",
        "| receiver | associations | instances/s | MB/s | p95 handling ms | ratio to bare "
        "| ratio to durable bare |",
        "|---|---|---|---|---|---|---|",
    ]
    for associations in (1, 4):
        subset = [r for r in runs if r.associations == associations]
        names = list(dict.fromkeys(r.receiver for r in subset))
        for name in names:
            mine = [r for r in subset if r.receiver == name]
            rate = statistics.median(r.per_second for r in mine)
            mbps = statistics.median(r.megabytes / r.seconds for r in mine)
            p95 = statistics.median(r.p95_ms for r in mine)
            lines.append(
                f"| {name} | {associations} | {rate:.1f} | {mbps:.1f} | {p95:.2f} | "
                f"{_paired(subset, name, BARE)} | {_paired(subset, name, DURABLE)} |"
            )
    bare = [r for r in runs if r.receiver == BARE and r.associations == 1]
    durable_runs = [r for r in runs if r.receiver == DURABLE and r.associations == 1]
    sq = [r for r in runs if r.receiver == FAST_SQLITE and r.associations == 1]
    pg = [r for r in runs if r.receiver == "sijnode fast (PostgreSQL)" and r.associations == 1]
    standard = [r for r in runs if r.receiver == STANDARD_SQLITE and r.associations == 1]
    med = statistics.median

    def handler(rs: list[Run]) -> float:
        return med(med(r.handler_ms) for r in rs)

    def audit(rs: list[Run]) -> float:
        return med(med(r.audit_ms) for r in rs)

    normal = [r for r in runs if r.receiver.endswith("synchronous=NORMAL)") and r.associations == 1]
    lines += [
        "",
        f"Median handling time per instance on one association: bare SCP "
        f"{handler(bare):.2f} ms, durable bare SCP {handler(durable_runs):.2f} ms, sijnode "
        f"{handler(sq):.2f} ms (SQLite), {handler(normal):.2f} ms (SQLite, synchronous=NORMAL), "
        f"{handler(pg):.2f} ms (PostgreSQL), sijnode standard mode {handler(standard):.2f} ms "
        "(SQLite). The bare SCPs and the standard mode also wait for pynetdicom's two "
        "polling loops around their handler (the association thread's, then the reader "
        "thread's, up to 1 ms each); the fast mode answers on the reader thread and skips "
        "both.",
        "",
        "Fast against standard mode, per round (one association, SQLite): "
        f"{_paired([r for r in runs if r.associations == 1], FAST_SQLITE, STANDARD_SQLITE)}.",
        "",
        f"Audit cost per instance (the audit statements, inside sijnode's handling time; "
        f"their commit runs beside the directory fsync): median {audit(sq):.2f} ms "
        f"(SQLite), {audit(pg):.2f} ms (PostgreSQL).",
        "",
    ]
    return "\n".join(lines)


def _paired(runs: list[Run], name: str, reference: str) -> str:
    """Median (and range) over the rounds of ``name``'s rate / ``reference``'s rate."""
    rates = {(r.receiver, r.round): r.per_second for r in runs}
    ratios = sorted(
        rates[(name, k)] / rates[(reference, k)]
        for (receiver, k) in rates
        if receiver == name and (reference, k) in rates
    )
    if name == reference:
        return "1.00×"
    return f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def write_section(path: Path, section: str) -> None:
    """Replace the ingest section of docs/benchmarks.md, keeping the others."""
    header = "## Ingest: sijnode against a bare pynetdicom SCP"
    text_now = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if header in text_now:
        before, _, rest = text_now.partition(header)
        after = rest.split("\n## ", 1)
        tail = ("\n## " + after[1]) if len(after) > 1 else ""
        text_now = before + section + tail
    else:
        text_now = text_now.rstrip("\n") + "\n\n" + section
    path.write_text(text_now)


if __name__ == "__main__":
    main()
