"""Stream benchmark: back-to-back studies into one long-running node, against a bare SCP.

A PACS sends studies one after the other, so the node's completion loop, routing and
dispatch of one study run while the next one arrives (issue 15). Here ``--studies``
different synthetic CT studies (``--slices`` slices of ``--size``² int16 each) are sent
with DCMTK ``storescu``, alternating study by study between ONE sijnode started once with
its defaults (completion on, embedded worker; without a model the jobs end ``no_model``)
and ONE bare pynetdicom SCP that only writes the received bytes. Every timed send starts
after a ``sync``. Per-study receive times (storescu's wall time) give p50, p95 and max
for each receiver, and their ratios (bare / node: above 1 the node is faster). In the
one-association SQLite configuration a third receiver takes its turn after them: a bare
SCP that writes each data set as durably as the node must (temporary file, fsync, rename,
directory fsync) and nothing else, the cost of durability alone.

The node's background work (completion checks that completed a study, dispatch, the
embedded worker's jobs, reconciler rounds) is timed too, and each node study is told
how much of it ran during its receive: the timeline of the run.

Configurations (``--configs``): ``sqlite`` (one association, SQLite audit: the target),
``sqlite4`` (4 concurrent associations, the slices split between them) and ``pg`` (one
association, PostgreSQL audit at 127.0.0.1:5432, database ``test``, a fresh schema).

    .venv/bin/python bench/stream.py --out docs/benchmarks.md          # all three, 20 studies
    .venv/bin/python bench/stream.py --studies 3 --slices 10 --size 64  # a smoke run

``--warmup`` (1) more studies go to each receiver first, untimed: the node is a
long-running one (the first study a fresh node receives is slower, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from sqlalchemy import create_engine, func, select, text

from sijnode.daemon.node import Node
from sijnode.daemon.scp import accepted_transfer_syntaxes
from sijnode.daemon.spool import fsync_directory
from sijnode.db.engine import transaction
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Instance, Study, StudyState
from sijnode.settings import load_settings
from sijnode.uids import DEFAULT_UID_ROOT, make_uid

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HEADER = "## Stream: back-to-back studies into one running node"
CONFIGS = {
    "sqlite": ("one association, SQLite audit", 1, "sqlite"),
    "sqlite4": ("4 associations, SQLite audit", 4, "sqlite"),
    "pg": ("one association, PostgreSQL audit", 1, "postgresql"),
}


def make_study(folder: Path, index: int, slices: int, size: int) -> list[Path]:
    """One synthetic axial CT series of ``slices`` slices; UIDs of its own per ``index``."""
    folder.mkdir(parents=True, exist_ok=True)
    study = make_uid(DEFAULT_UID_ROOT, ["stream", str(os.getpid()), str(index), "study"])
    series = make_uid(DEFAULT_UID_ROOT, ["stream", str(os.getpid()), str(index), "series"])
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 1500, (size, size), dtype=np.int16)
    paths = []
    for i in range(1, slices + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = make_uid(DEFAULT_UID_ROOT, ["stream", study, str(i)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "STREAM^PATIENT", f"STREAM-{index}"
        ds.Modality, ds.BodyPartExamined, ds.ImageType = "CT", "PELVIS", ["ORIGINAL", "PRIMARY"]
        ds.SeriesNumber, ds.InstanceNumber, ds.ImagesInAcquisition = 1, i, slices
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
def bare_scp(root: Path, durable: bool = False) -> Iterator[tuple[int, list[int]]]:
    """A minimal pynetdicom SCP (its defaults) that writes the raw bytes; [count].

    ``durable``: written as durably as the node must before Success (temporary file,
    fsync, rename, directory fsync) and nothing else: the cost of durability alone.
    """
    root.mkdir(parents=True, exist_ok=True)
    count = [0]

    def handle(event: evt.Event) -> int:
        name = f"{event.request.AffectedSOPInstanceUID}.dcm"
        if durable:
            tmp = root / f".{name}.part"
            with tmp.open("wb") as fh:
                fh.write(event.encoded_dataset())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, root / name)
            fsync_directory(root)  # the node's own call
        else:
            (root / name).write_bytes(event.encoded_dataset())
        count[0] += 1
        return 0

    ae = AE(ae_title="SIJNODE")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 8
    syntaxes = accepted_transfer_syntaxes()
    for cx in StoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    try:
        yield int(server.server_address[1]), count
    finally:
        server.shutdown()


@dataclass
class Timeline:
    """Intervals (perf_counter seconds) of the node's background work, by kind."""

    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, kind: str, function: Callable[..., Any], only: Callable[[Any], bool]) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            result = function(*args, **kwargs)
            if only(result):
                with self.lock:
                    self.busy.setdefault(kind, []).append((t0, time.perf_counter()))
            return result

        return timed

    def overlap(self, start: float, end: float) -> dict[str, float]:
        """Seconds of each kind of work inside [start, end]."""
        with self.lock:
            return {
                kind: sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)
                for kind, spans in self.busy.items()
            }


@contextmanager
def running_node(
    root: Path, db_url: str, overrides: dict[str, dict[str, Any]]
) -> Iterator[tuple[Node, Timeline]]:
    """One sijnode with its defaults (completion on, embedded worker), started once."""
    import sijnode.workers.embedded as embedded

    upgrade(db_url)
    settings_overrides: dict[str, dict[str, Any]] = {
        "database": {"url": db_url},
        "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 100},
        "node": {"port": _free_port(), "bind_address": "127.0.0.1"},
        "metrics": {"port": 0},
    }
    for section, values in overrides.items():
        settings_overrides.setdefault(section, {}).update(values)
    node = Node(load_settings(overrides=settings_overrides))
    timeline = Timeline()
    node.check_studies = timeline.wrap(  # type: ignore[method-assign]
        "completion", node.check_studies, bool
    )
    node.dispatcher.dispatch_study = timeline.wrap(  # type: ignore[method-assign]
        "dispatch", node.dispatcher.dispatch_study, lambda _: True
    )
    node.reconciler.run_once = timeline.wrap(  # type: ignore[method-assign]
        "reconcile", node.reconciler.run_once, lambda _: True
    )
    original_job = embedded.execute_job
    embedded.execute_job = timeline.wrap("job", original_job, lambda _: True)  # type: ignore[assignment]
    try:
        node.start()
        yield node, timeline
    finally:
        node.stop()
        embedded.execute_job = original_job  # type: ignore[assignment]


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


def _drop_pg_schema(name: str) -> None:
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'drop schema if exists "{name}" cascade'))
    engine.dispose()


@dataclass
class StreamResult:
    """One configuration's stream: per-study seconds of each receiver, and the timeline."""

    config: str
    node: list[float]
    bare: list[float]
    overlap: list[dict[str, float]]
    dispatched: int
    stored: int
    warmup: list[tuple[float, float]] = field(default_factory=list)
    #: The durable bare SCP's seconds per study (one-association SQLite configuration).
    durable: list[float] = field(default_factory=list)

    def stats(self, which: str) -> tuple[float, float, float]:
        values = getattr(self, which)
        return (
            float(np.percentile(values, 50)),
            float(np.percentile(values, 95)),
            float(max(values)),
        )


def run_stream(
    config: str,
    studies: list[list[Path]],
    workdir: Path,
    overrides: dict[str, dict[str, Any]],
    settle: float,
    warmup: list[list[Path]],
) -> StreamResult:
    """Send every study to the node and to the bare SCP in turn; time each receive."""
    _, associations, database = CONFIGS[config]
    schema = f"bench_stream_{os.getpid()}_{config}"
    db_url = (
        _fresh_pg_schema(schema)
        if database == "postgresql"
        else f"sqlite:///{workdir / 'audit.db'}"
    )
    node_times: list[float] = []
    bare_times: list[float] = []
    overlaps: list[dict[str, float]] = []
    warmup_times: list[tuple[float, float]] = []
    durable_times: list[float] = []
    slices = sum(len(s) for s in studies + warmup)
    # the cost of durability alone, beside the target's configuration
    with_durable = config == "sqlite"
    try:
        with (
            running_node(workdir / "node", db_url, overrides) as (node, timeline),
            bare_scp(workdir / "bare") as (bare_port, bare_count),
            bare_scp(workdir / "durable", durable=True) as (durable_port, _),
        ):
            for files in warmup:  # untimed: the node has received studies before
                os.sync()
                node_seconds = storescu(node.scp.port, files, associations)
                os.sync()
                warmup_times.append((node_seconds, storescu(bare_port, files, associations)))
                print(
                    f"{config:8s} warm-up: node {warmup_times[-1][0]:6.2f} s  "
                    f"bare {warmup_times[-1][1]:6.2f} s",
                    flush=True,
                )
            for index, files in enumerate(studies):
                os.sync()
                t0 = time.perf_counter()
                seconds = storescu(node.scp.port, files, associations)
                node_times.append(seconds)
                overlaps.append(timeline.overlap(t0, t0 + seconds))
                os.sync()
                bare_times.append(storescu(bare_port, files, associations))
                if with_durable:
                    os.sync()
                    durable_times.append(storescu(durable_port, files, associations))
                busy = ", ".join(f"{k} {v:.2f} s" for k, v in overlaps[-1].items() if v)
                print(
                    f"{config:8s} study {index + 1:2d}: node {node_times[-1]:6.2f} s  "
                    f"bare {bare_times[-1]:6.2f} s  "
                    + (f"durable bare {durable_times[-1]:6.2f} s  " if with_durable else "")
                    + f"(during the node's receive: {busy or 'nothing'})",
                    flush=True,
                )
            # let the last study complete and dispatch (the node's default timers)
            deadline = time.monotonic() + settle
            while time.monotonic() < deadline:
                if _dispatched(node) == len(studies) + len(warmup):
                    break
                time.sleep(0.5)
            if bare_count[0] != slices:
                raise RuntimeError(f"bare SCP: {bare_count[0]} of {slices} received")
            with transaction(node.sessions) as session:
                stored = int(session.scalar(select(func.count()).select_from(Instance)) or 0)
            dispatched = _dispatched(node)
        if stored != slices:
            raise RuntimeError(f"sijnode: {stored} of {slices} instances recorded")
    finally:
        if database == "postgresql":
            _drop_pg_schema(schema)
    return StreamResult(
        config, node_times, bare_times, overlaps, dispatched, stored, warmup_times, durable_times
    )


def _dispatched(node: Node) -> int:
    with transaction(node.sessions) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(Study)
                .where(Study.state.in_([StudyState.DISPATCHED, StudyState.IGNORED]))
            )
            or 0
        )


def render(results: list[StreamResult], args: argparse.Namespace, note: str) -> str:
    """The markdown section for docs/benchmarks.md."""
    lines = [
        HEADER,
        "",
        f"`bench/stream.py`: {args.studies} different synthetic CT studies of {args.slices} "
        f"slices of {args.size}² int16, sent by DCMTK `storescu` back to back, alternating "
        "study by study between ONE sijnode started once with its defaults (completion on: "
        "the previous study's completion, routing and dispatch overlap the next receive; "
        "embedded worker, no model: jobs end `no_model`) and ONE bare pynetdicom SCP that "
        "writes the raw bytes only. A `sync` before every timed send. Seconds per study "
        "(storescu's wall time); ratio = bare / node (above 1: the node is faster). "
        f"Before them {args.warmup} other study(ies) went to each receiver untimed (a "
        "long-running node has received studies before; their times are listed below). "
        f"Command: `.venv/bin/python bench/stream.py {' '.join(sys.argv[1:])}`.",
        "",
        "| configuration | node p50 s | node p95 s | node max s | bare p50 s | bare p95 s "
        "| bare max s | p50 ratio | p95 ratio | max ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n50, n95, nmax = r.stats("node")
        b50, b95, bmax = r.stats("bare")
        lines.append(
            f"| {CONFIGS[r.config][0]} | {n50:.2f} | {n95:.2f} | {nmax:.2f} | {b50:.2f} | "
            f"{b95:.2f} | {bmax:.2f} | {b50 / n50:.2f}× | {b95 / n95:.2f}× | "
            f"{bmax / nmax:.2f}× |"
        )
    lines.append("")
    for r in results:
        if not r.durable:
            continue
        n50, n95, _ = r.stats("node")
        d50, d95, dmax = r.stats("durable")
        pairs = sorted(d / n for n, d in zip(r.node, r.durable, strict=True))
        lines += [
            f"Durable bare SCP, {CONFIGS[r.config][0]} (the same turns: it writes each data "
            "set as durably as the node must before Success, temporary file, fsync, rename, "
            f"directory fsync, and nothing else): p50 {d50:.2f} s, p95 {d95:.2f} s, max "
            f"{dmax:.2f} s; durable bare / node p50 {d50 / n50:.2f}×, p95 {d95 / n95:.2f}×, "
            f"per-study paired median {statistics.median(pairs):.2f}× "
            f"({pairs[0]:.2f}–{pairs[-1]:.2f}). Per study: "
            + ", ".join(f"{t:.2f}" for t in r.durable)
            + ".",
            "",
        ]
    for r in results:
        overlapped = [
            t for t, o in zip(r.node, r.overlap, strict=True) if o.get("completion", 0) > 0
        ]
        pairs = sorted(b / n for n, b in zip(r.node, r.bare, strict=True))
        lines.append(
            f"- {CONFIGS[r.config][0]}: {r.stored} instances recorded, {r.dispatched} of "
            f"{len(r.node) + len(r.warmup)} studies dispatched; {len(overlapped)} node "
            "receives overlapped "
            "a completion check that completed a study"
            + (f" (their median {statistics.median(overlapped):.2f} s)" if overlapped else "")
            + f"; per-study paired ratio bare/node median {statistics.median(pairs):.2f}× "
            f"({pairs[0]:.2f}–{pairs[-1]:.2f})."
        )
    lines.append("")
    for r in results:
        lines.append(
            f"Per study, {CONFIGS[r.config][0]} (s, in sending order): node "
            + ", ".join(f"{t:.2f}" for t in r.node)
            + "; bare "
            + ", ".join(f"{t:.2f}" for t in r.bare)
            + "."
            + (
                " Warm-up (not in the figures): "
                + ", ".join(f"node {n:.2f}, bare {b:.2f}" for n, b in r.warmup)
                + "."
                if r.warmup
                else ""
            )
        )
        lines.append("")
    if note:
        lines += [note, ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the stream section of ``path``, keeping the others."""
    text_now = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if HEADER in text_now:
        before, _, rest = text_now.partition(HEADER)
        after = rest.split("\n## ", 1)
        tail = ("\n## " + after[1]) if len(after) > 1 else ""
        text_now = before + section + tail
    else:
        text_now = text_now.rstrip("\n") + "\n\n" + section
    path.write_text(text_now)


def _overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``section.key=value`` settings (JSON values where they parse) for experiments."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        section, _, name = key.partition(".")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed studies sent to each receiver first (a long-running node; 0: none)",
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--configs", default="sqlite,sqlite4,pg", help="comma-separated: sqlite, sqlite4, pg"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a node setting for experiments (the figures use the defaults)",
    )
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds to wait for the last dispatch"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the section into FILE")
    parser.add_argument("--json", type=Path, default=None, help="write every figure as JSON")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: expected some of {', '.join(CONFIGS)}, got {unknown}")
    overrides = _overrides(args.set)
    logging.getLogger("sijnode").setLevel(logging.ERROR)  # "job waits: no model", etc.
    results: list[StreamResult] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = [
            make_study(tmp / "studies" / f"s{i:02d}", i, args.slices, args.size)
            for i in range(args.studies + args.warmup)
        ]
        for config in configs:
            workdir = tmp / config
            workdir.mkdir()
            results.append(
                run_stream(
                    config,
                    studies[args.warmup :],
                    workdir,
                    overrides,
                    args.settle,
                    studies[: args.warmup],
                )
            )
            shutil.rmtree(workdir)  # the next configuration's disk
    note = (
        f"Settings changed for this run: {args.set}." if args.set else ""
    )  # the figures are for the defaults
    report = render(results, args, note)
    print(report)
    if args.out:
        write_section(args.out, report)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
