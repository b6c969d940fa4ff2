"""Latency from the last instance of a study to ``delivered``, split by stage (embedded mode).

A node as deployed without a broker (``sijnode serve`` runs jobs in its child process)
with seeded weights, the default completion settings (unless ``--quiet`` is given) and
DCMTK ``storescp`` as the destination. For a 37-slice synthetic MR study and a synthetic
CT study, each sent by C-STORE, the time from the last instance to the job's
``delivered`` state is read from the audit's own timestamps and split into

- *completion*: last instance received → study complete (the completion rule's quiet time);
- *dispatch*: study complete → a worker claims the job (``running``);
- *infer*: ``running`` → ``inferred`` (decode, preprocess, localise, forward, Grad-CAM,
  recording; the pipeline's own stage clock is printed beside it);
- *report*: ``inferred`` → ``reported`` (SR, captures, KOS built, written, recorded);
- *deliver*: ``reported`` → ``delivered`` (the delivery loop's wake-up, C-STORE).

    .venv/bin/python bench/latency.py                                  # full size (lead)
    .venv/bin/python bench/latency.py --size 64 --quiet 1 --ct-slices 6 --mr-slices 6
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts
from sqlalchemy import func, select

from sijnode.daemon.node import Node
from sijnode.db.migrate import upgrade
from sijnode.db.schema import Instance, Job, JobState, JobTransition, Study
from sijnode.models.architectures import fixed_box_localizer_state, seeded_state_dict
from sijnode.models.checkpoint import save_checkpoint
from sijnode.models.spec import OperatingPoints, ct_spec, localizer_spec, mr_spec
from sijnode.settings import load_settings
from sijnode.synth import SynthStudy, generate_ct_study, generate_mr_study

STAGES = ("completion", "dispatch", "infer", "report", "deliver", "total")


def _free_port() -> int:
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
def storescp(port: int, out_dir: Path) -> Iterator[None]:
    binary = shutil.which("storescp")
    if binary is None:
        raise SystemExit("DCMTK storescp is needed as the destination (apt-get install dcmtk)")
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "-aet", "DEST", "-od", str(out_dir), "-uf", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def node(root: Path, pipelines: dict[str, Any], quiet: float | None, dest: int) -> Iterator[Node]:
    """A started embedded node on SQLite whose child has loaded the models."""
    completion: dict[str, Any] = (
        {} if quiet is None else {"quiet_seconds": quiet, "content_quiet_seconds": min(quiet, 5.0)}
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
            "destinations": [
                {"name": "storescp", "ae_title": "DEST", "host": "127.0.0.1", "port": dest}
            ],
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


def send(datasets: list[Dataset], port: int) -> None:
    ae = AE(ae_title="BENCH")
    ae.requested_contexts = StoragePresentationContexts[:100]
    assoc = ae.associate("127.0.0.1", port, ae_title="SIJNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert int(status.Status) == 0, status
    finally:
        assoc.release()


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()


def stage_split(n: Node, uid: str, timeout: float = 1800) -> dict[str, float]:
    """Wait for the study's job to be delivered; its stage times from the audit."""
    deadline = time.monotonic() + timeout
    while True:
        with n.sessions() as s:
            job = s.scalars(select(Job).join(Study).where(Study.study_instance_uid == uid)).first()
            if job is not None and job.state is JobState.DELIVERED:
                study = s.get_one(Study, job.study_id)
                last = s.scalar(
                    select(func.max(Instance.received_at)).where(Instance.study_id == study.id)
                )
                at = {
                    state: when
                    for state, when in s.execute(
                        select(JobTransition.state, JobTransition.at)
                        .where(JobTransition.job_id == job.id)
                        .order_by(JobTransition.id)
                    ).all()
                }
                timings = dict(job.stage_timings or {})
                break
            if job is not None and job.state in (JobState.FAILED, JobState.NO_MODEL):
                raise RuntimeError(f"job ended {job.state.value}: {job.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no delivered job within {timeout} s")
        time.sleep(0.05)
    assert last is not None and study.completed_at is not None
    out = {
        "completion": _seconds(last, study.completed_at),
        "dispatch": _seconds(study.completed_at, at[JobState.RUNNING]),
        "infer": _seconds(at[JobState.RUNNING], at[JobState.INFERRED]),
        "report": _seconds(at[JobState.INFERRED], at[JobState.REPORTED]),
        "deliver": _seconds(at[JobState.REPORTED], at[JobState.DELIVERED]),
        "total": _seconds(last, at[JobState.DELIVERED]),
    }
    out["pipeline_stages"] = sum(
        float(timings.get(k, 0.0)) for k in ("decode", "preprocess", "localise", "infer", "explain")
    )
    out["report_stage"] = float(timings.get("report", 0.0))
    return out


def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    root = Path(tempfile.mkdtemp(prefix="sijnode-latency-"))
    models = root / "models"
    models.mkdir()
    size = args.size
    # slice threshold 0: every slice is positive, so gradcam.max_images (8) are explained,
    # as for a positive study (the report's worst case)
    ct = ct_spec(
        size=size, operating_points=OperatingPoints(slice_threshold=0.0, study_threshold=0.5)
    )
    save_checkpoint(models / "ct.safetensors", ct, seeded_state_dict(ct, 5))
    first_mr = generate_mr_study(
        seed=1, subject_index=1, positive=True, side="both", n_slices=args.mr_slices
    )
    mr = mr_spec(
        size=size, operating_points=OperatingPoints(slice_threshold=0.0, subject_threshold=0.5)
    )
    save_checkpoint(models / "mr.safetensors", mr, seeded_state_dict(mr, 5))
    loc = localizer_spec(size=min(size, 128))
    state = fixed_box_localizer_state(loc, _mean_boxes(first_mr), 1)
    save_checkpoint(models / "loc.safetensors", loc, state)
    pipelines = {
        "ct": {"model": str(models / "ct.safetensors"), "device": "cpu"},
        "mr": {
            "model": str(models / "mr.safetensors"),
            "localizer": str(models / "loc.safetensors"),
            "device": "cpu",
        },
    }
    dest = _free_port()
    results: dict[str, list[dict[str, float]]] = {"mr": [], "ct": []}
    with storescp(dest, root / "received"), node(root / "node", pipelines, args.quiet, dest) as n:
        for index in range(args.rounds):
            mr_study = generate_mr_study(
                seed=1, subject_index=index + 1, positive=True, side="both", n_slices=args.mr_slices
            )
            send(mr_study.datasets, n.settings.node.port)
            results["mr"].append(stage_split(n, mr_study.study_instance_uid))
            ct_study = generate_ct_study(
                seed=2, subject_index=index + 1, positive=True, n_slices=args.ct_slices
            )
            send(ct_study.datasets, n.settings.node.port)
            results["ct"].append(stage_split(n, ct_study.study_instance_uid))
    shutil.rmtree(root, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--mr-slices", type=int, default=37)
    parser.add_argument("--ct-slices", type=int, default=60)
    parser.add_argument(
        "--quiet", type=float, default=None, help="completion quiet seconds (default: settings)"
    )
    args = parser.parse_args()
    results = run(args)
    for name, label in (("mr", f"MR {args.mr_slices} slices"), ("ct", f"CT {args.ct_slices}")):
        print(f"{label}, last instance -> delivered (s), median of {args.rounds}:")
        for stage in (*STAGES, "pipeline_stages", "report_stage"):
            values = [r[stage] for r in results[name]]
            print(f"  {stage:16s} {statistics.median(values):8.3f}   {values}")


if __name__ == "__main__":
    main()
