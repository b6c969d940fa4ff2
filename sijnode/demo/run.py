"""The demo's loop: data, models, node and PACS, held-out studies, results.

``python -m sijnode.demo.run [--out demo] [--timeout S] [--keep-running]`` (``scripts/demo``).
Every stage has a timeout; when one is not reached the demo says which, shows what it has
and stops everything it started (:mod:`sijnode.demo.processes`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from sijnode.demo.models import Checkpoints, TrainingPlan, synth, trained_checkpoints
from sijnode.demo.pacs import PACS_AE, Pacs, start_pacs
from sijnode.demo.processes import DemoError, Processes, sijnode_command, wait_until

#: Slices per held-out study (as the training tools' learning tests score them).
HELD_OUT_SLICES = 8
#: Where the results are expected to get to, in order (the job states of the audit).
STAGES = ("received", "complete", "queued", "running", "inferred", "reported", "delivered")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HeldOut:
    """One held-out study: its files and its synthetic truth."""

    modality: str
    study_uid: str
    label: int
    side: str
    files: list[Path] = field(default_factory=list)


def held_out_studies(folder: Path) -> list[HeldOut]:
    """The studies of a ``sijnode synth`` folder, from its ``labels.csv``."""
    studies = []
    with (folder / "labels.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            files = sorted((folder / row["folder"]).rglob("*.dcm"))
            studies.append(
                HeldOut(row["modality"], row["StudyInstanceUID"], int(row["label"]), row["side"])
            )
            studies[-1].files = files
    return studies


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, tables: dict[str, dict[str, object]], top: dict[str, object]) -> None:
    """A small TOML writer for the node's configuration (tables of scalars)."""
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for name, values in tables.items():
        if name.startswith("[["):
            lines.append(f"\n{name}")
        else:
            lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")


def node_config(run: Path, port: int, pacs: Pacs, versions: dict[str, str]) -> Path:
    """The node's settings: SQLite audit, embedded worker, the PACS as destination."""
    destination: dict[str, object] = {
        "name": "pacs",
        "ae_title": PACS_AE,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "storage_commitment": pacs.kind == "orthanc",
    }
    path = run / "sijnode.toml"
    write_config(
        path,
        {
            "node": {"ae_title": "SIJNODE", "port": port, "bind_address": "127.0.0.1"},
            "storage": {"spool_dir": str(run / "spool"), "min_free_mb": 1},
            "database": {
                "url": f"sqlite:///{run / 'sijnode.db'}",
                "pseudonym_secret": "demo-only-secret",
            },
            "completion": {
                "quiet_seconds": 5.0,
                "content_quiet_seconds": 1.0,
                "check_interval_seconds": 0.5,
            },
            "delivery": {"check_interval_seconds": 0.5, "backoff_seconds": 1.0},
            "metrics": {"port": 0},
            "logging": {"json_format": True},
            "pipelines.ct": {"model": versions["ct"], "device": "cpu", "batch_size": 8},
            "pipelines.ct.gradcam": {"max_images": 2},
            "pipelines.mr": {
                "model": versions["mr"],
                "localizer": versions["localizer"],
                "device": "cpu",
                "batch_size": 8,
            },
            "pipelines.mr.gradcam": {"max_images": 2},
            "[[destinations]]": destination,
        },
        {"data_dir": str(run / "var")},
    )
    return path


def import_models(
    procs: Processes, config: Path, files: dict[str, Path], log: Path
) -> dict[str, str]:
    """``sijnode models import`` each checkpoint; the imported versions by name."""
    versions = {}
    for name, path in files.items():
        before = log.stat().st_size if log.exists() else 0
        procs.run(
            f"models import {name}",
            sijnode_command(config, "models", "import", str(path)),
            log,
            300,
        )
        out = log.read_text(errors="replace")[before:]
        line = next((ln for ln in out.splitlines() if ln.startswith("imported ")), None)
        if line is None:
            raise DemoError(f"models import {name} printed no version (log: {log})")
        versions[name] = line.split()[1]
    return versions


def echo_ok(port: int) -> bool:
    """Whether the node answers C-ECHO."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused while starting
    ae = AE(ae_title=PACS_AE)
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


@dataclass
class Timings:
    """Seconds per demo stage, printed at the end."""

    stages: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.monotonic)

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.stages[name] = now - self._t
        self._t = now


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Train quick models on synthetic studies, run the node against a local "
        "PACS and show what came back (research use only).",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo"), help="Demo folder (default demo)."
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="Seconds to wait for the results (default 300)."
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="Keep the node and the PACS running after the summary, until Ctrl-C.",
    )
    parser.add_argument(
        "--held-out", type=int, default=2, help="Held-out studies per modality (default 2)."
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=None,
        help="Use ct.safetensors, mr.safetensors and localizer.safetensors from this folder "
        "instead of training.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every study got its results back, 1 otherwise."""
    from sijnode.demo import show

    args = parse_args(argv)
    console = Console()
    say = lambda text: console.print(f"[bold cyan]demo[/]: {text}")  # noqa: E731
    out = args.out.resolve()
    run = out / "run"
    log = run / "demo.log"
    timings = Timings()
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    plan = TrainingPlan()
    try:
        with Processes() as procs:
            if args.checkpoints is not None:
                given = args.checkpoints.resolve()
                checkpoints = Checkpoints(
                    given / "ct.safetensors",
                    given / "mr.safetensors",
                    given / "localizer.safetensors",
                    cached=False,
                )
                say(f"checkpoints given in {given}")
                timings.mark("models (given)")
            else:
                checkpoints = trained_checkpoints(procs, out / "cache", plan, log, say)
                timings.mark("models (cached)" if checkpoints.cached else "training")
            studies: list[HeldOut] = []
            for modality, seed in (("ct", 1001), ("mr", 1002)):
                folder = synth(
                    procs,
                    run / "studies" / modality,
                    modality,
                    args.held_out,
                    seed,
                    log,
                    slices=HELD_OUT_SLICES,
                )
                studies += held_out_studies(folder)
            timings.mark("held-out studies")
            port = free_port()
            say("starting the PACS")
            pacs = start_pacs(procs, run / "pacs", free_port(), free_port(), port)
            setup = _write_import_config(run)
            procs.run("db upgrade", sijnode_command(setup, "db", "upgrade"), log, 300)
            files = {"ct": checkpoints.ct, "mr": checkpoints.mr, "localizer": checkpoints.localizer}
            versions = import_models(procs, setup, files, log)
            config = node_config(run, port, pacs, versions)
            say(f"starting the node (sijnode --config {config} serve) and {pacs.kind}")
            procs.start("node", sijnode_command(config, "serve"), run / "node.log")

            def node_up() -> bool:
                procs.check_alive("node")
                return echo_ok(port)

            wait_until("the node answering C-ECHO", node_up, timeout=120)
            pacs.load([f for s in studies for f in s.files])
            timings.mark("node and PACS up")
            for study in studies:
                say(f"{pacs.kind} sends {study.modality} study {study.study_uid} to the node")
                pacs.push(procs, study.study_uid, study.files, port)
            results = show.wait_results(config, [s.study_uid for s in studies], args.timeout, procs)
            timings.mark("results")
            show.report(console, config, run, pacs, studies, results)
            show.truth_and_metrics(console, procs, config, run, studies, log)
            picture = show.overview(out / "overview.png", config, studies, results)
            if picture is not None:
                say(f"wrote {picture}")
            timings.mark("summary")
            show.timings(console, timings.stages)
            if args.keep_running:
                say("the node and the PACS keep running; Ctrl-C stops them")
                while True:
                    procs.check_alive("node")
                    time.sleep(1)
            return 0 if all(r.delivered for r in results.values()) else 1
    except KeyboardInterrupt:
        console.print("[yellow]demo: interrupted; everything it started is stopped[/]")
        return 130
    except DemoError as exc:
        console.print(f"[red]demo: {exc}[/]")
        console.print(f"logs: {run}")
        return 1


def _write_import_config(run: Path) -> Path:
    """Settings for ``models import``: the node's data directory and audit."""
    write_config(
        run / "import.toml",
        {
            "database": {
                "url": f"sqlite:///{run / 'sijnode.db'}",
                "pseudonym_secret": "demo-only-secret",
            },
            "metrics": {"port": 0},
        },
        {"data_dir": str(run / "var")},
    )
    return run / "import.toml"


if __name__ == "__main__":
    sys.exit(main())
