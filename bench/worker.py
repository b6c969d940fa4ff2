"""Worker benchmark: latency to ``inferred`` and ingest while a job runs (embedded mode).

Two figures of the node as deployed without a broker (``sijnode serve`` runs jobs in its
child process), with seeded weights (``sijnode.synth`` studies, a localiser that predicts
the study's mean truth boxes):

- **MR latency**: from the last C-STORE response of a 37-slice synthetic MR study to its
  job in ``inferred``, with the default completion settings (so most of it is the
  completion rule's quiet period), split into *completion* (last instance → study
  complete) and *job* (complete → inferred);
- **ingest while a CT job runs**: instances/s of a C-STORE transfer while the child runs
  a long CT job, as a ratio to the same transfer with the worker idle (the listener
  never shares its GIL with inference).

    .venv/bin/python bench/worker.py --rounds 3                       # full size
    .venv/bin/python bench/worker.py --rounds 1 --size 64 --quiet 1 --ct-slices 12 --ingest 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import select

from sijnode.daemon.node import Node
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Job, JobState, Study
from sijnode.models.architectures import fixed_box_localizer_state, seeded_state_dict
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.spec import ct_spec, localizer_spec, mr_spec
from sijnode.settings import load_settings
from sijnode.synth import SynthStudy, generate_ct_study, generate_mr_study


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mean_boxes(study: SynthStudy) -> tuple[float, ...]:
    rows, columns = int(study.datasets[0].Rows), int(study.datasets[0].Columns)
    rois = [r for s in study.slices for r in s.rois]
    out: list[float] = []
    for side in ("right", "left"):  # patient right is on the image's left
        boxes = [(r.x0, r.y0, r.x1, r.y1) for r in rois if r.side == side]
        x0, y0, x1, y1 = (statistics.fmean(b[i] for b in boxes) for i in range(4))
        out += [x0 / columns, y0 / rows, x1 / columns, y1 / rows]
    return tuple(out)


@contextmanager
def node(root: Path, pipelines: dict[str, Any], quiet: float | None) -> Iterator[Node]:
    """A started embedded node on SQLite; its child has loaded the models."""
    completion: dict[str, Any] = (
        {}
        if quiet is None
        else {
            "quiet_seconds": quiet,
            "content_quiet_seconds": min(quiet, 5.0),
            "check_interval_seconds": 0.2,
        }
    )
    settings = load_settings(
        overrides={
            "data_dir": str(root / "data"),
            "database": {"url": f"sqlite:///{root / 'audit.db'}", "pseudonym_secret": "bench"},
            "storage": {"spool_dir": str(root / "spool"), "min_free_mb": 1},
            "node": {"port": _free_port(), "bind_address": "127.0.0.1"},
            "metrics": {"port": 0},
            "completion": completion,
            "pipelines": pipelines,
            "logging": {"level": "WARNING"},
        }
    )
    upgrade(settings.database.url)
    n = Node(settings)
    n.start()
    try:
        assert n.embedded is not None
        deadline = time.monotonic() + 300
        while n.embedded.child_pid is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(5)  # let the child finish loading its models
        yield n
    finally:
        n.stop()


def send(datasets: list[Dataset], port: int) -> float:
    """Send on one association; return the time of the last response (monotonic)."""
    ae = AE(ae_title="BENCH")
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert int(status.Status) == 0, status
        return time.monotonic()
    finally:
        assoc.release()


def _job(n: Node, uid: str) -> tuple[Job | None, Study | None]:
    with n.sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).first()
        job = s.scalars(select(Job).join(Study).where(Study.study_instance_uid == uid)).first()
        return job, study


#: The worker reports a job right after inferring it: ``inferred`` is seen as passed.
_AT_OR_PAST = {
    JobState.INFERRED: {JobState.INFERRED, JobState.REPORTED, JobState.DELIVERED, JobState.SHADOW}
}


def wait_state(n: Node, uid: str, state: JobState, timeout: float = 900) -> tuple[Job, Study]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job, study = _job(n, uid)
        if job is not None and study is not None and job.state in _AT_OR_PAST.get(state, {state}):
            return job, study
        if job is not None and job.state in (JobState.FAILED, JobState.NO_MODEL):
            raise RuntimeError(f"job ended {job.state.value}: {job.error}")
        time.sleep(0.05)
    raise TimeoutError(f"no {state.value} job within {timeout} s")


def mr_latency(root: Path, size: int, rounds: int, quiet: float | None) -> list[dict[str, float]]:
    models = root / "models"
    models.mkdir(parents=True)
    first = generate_mr_study(seed=1, subject_index=1, positive=True, side="both", n_slices=37)
    mr = mr_spec(size=size)
    save_checkpoint(models / "mr.safetensors", mr, seeded_state_dict(mr, 5))
    loc = localizer_spec(size=size)
    save_checkpoint(
        models / "loc.safetensors", loc, fixed_box_localizer_state(loc, _mean_boxes(first), 1)
    )
    pipelines = {
        "mr": {
            "model": str(models / "mr.safetensors"),
            "localizer": str(models / "loc.safetensors"),
            "device": "cpu",
        }
    }
    out = []
    with node(root / "mr-node", pipelines, quiet) as n:
        for index in range(rounds):
            study = generate_mr_study(
                seed=1, subject_index=index + 1, positive=True, side="both", n_slices=37
            )
            last = send(study.datasets, n.settings.node.port)
            last_wall = time.time()
            job, row = wait_state(n, study.study_instance_uid, JobState.INFERRED)
            done = time.monotonic()
            completed = row.completed_at.timestamp() if row.completed_at else last_wall
            out.append(
                {
                    "total": done - last,
                    "completion": completed - last_wall,
                    "job": (done - last) - (completed - last_wall),
                    "infer_stage": float(job.stage_timings.get("infer", 0.0)),
                }
            )
    return out


def ingest_ratio(root: Path, size: int, rounds: int, ct_slices: int, n_ingest: int) -> list[float]:
    models = root / "models-ct"
    models.mkdir(parents=True)
    ct = ct_spec(size=size)
    save_checkpoint(models / "ct.safetensors", ct, seeded_state_dict(ct, 5))
    pipelines = {"ct": {"model": str(models / "ct.safetensors"), "device": "cpu"}}
    ratios = []
    with node(root / "ct-node", pipelines, quiet=1.0) as n:
        port = n.settings.node.port
        for index in range(rounds):
            base = 100 * (index + 1)
            idle = generate_ct_study(
                seed=2, subject_index=base + 1, positive=True, n_slices=n_ingest
            )
            started = time.monotonic()
            send(idle.datasets, port)
            idle_rate = n_ingest / (time.monotonic() - started)
            long = generate_ct_study(
                seed=2, subject_index=base + 2, positive=True, n_slices=ct_slices
            )
            send(long.datasets, port)
            wait_state(n, long.study_instance_uid, JobState.RUNNING)
            busy = generate_ct_study(
                seed=2, subject_index=base + 3, positive=True, n_slices=n_ingest
            )
            started = time.monotonic()
            send(busy.datasets, port)
            busy_rate = n_ingest / (time.monotonic() - started)
            job, _ = _job(n, long.study_instance_uid)
            still_running = job is not None and job.state is JobState.RUNNING
            ratios.append(busy_rate / idle_rate if still_running else float("nan"))
            wait_state(n, long.study_instance_uid, JobState.INFERRED)
            wait_state(n, busy.study_instance_uid, JobState.INFERRED)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="Model input size.")
    parser.add_argument(
        "--quiet", type=float, default=None, help="completion.quiet_seconds (default: defaults)"
    )
    parser.add_argument("--ct-slices", type=int, default=120, help="Slices of the long CT job.")
    parser.add_argument("--ingest", type=int, default=100, help="Slices sent while it runs.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sijnode-bench-worker-") as tmp:
        root = Path(tmp)
        latency = mr_latency(root, args.size, args.rounds, args.quiet)
        ratios = ingest_ratio(root, args.size, args.rounds, args.ct_slices, args.ingest)
    print("MR 37 slices, last instance -> inferred (s), per round:")
    for r in latency:
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()))
    print(f"  median total {statistics.median(r['total'] for r in latency):.2f} s")
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"ingest while a CT job runs / idle ingest, per round: {shown}")
    valid = [r for r in ratios if r == r]
    if valid:
        print(f"  median {statistics.median(valid):.2f} (nan: the job ended before the transfer)")


if __name__ == "__main__":
    main()
