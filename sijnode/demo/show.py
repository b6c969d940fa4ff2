"""What the demo shows: per-study tables, where the results are, the SR tree in short,
``sijnode audit metrics`` after the truth import, and ``demo/overview.png``.

Results are read from the node's audit database (the same rows ``sijnode audit`` lists);
a study whose results did not come back is shown with the last stage it reached.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from sijnode.db.engine import make_engine, make_sessionmaker
from sijnode.db.schema import (
    Delivery,
    DeliveryStatus,
    Job,
    JobState,
    Output,
    OutputKind,
    Prediction,
    Study,
    StudyState,
    as_utc,
)
from sijnode.demo.processes import Processes, sijnode_command
from sijnode.settings import load_settings

if TYPE_CHECKING:
    from sijnode.demo.pacs import Pacs
    from sijnode.demo.run import HeldOut

#: Job states after which nothing more happens to a job.
_FINAL = (JobState.DELIVERED, JobState.SHADOW, JobState.FAILED, JobState.NO_MODEL)
_DELIVERY_FINAL = (DeliveryStatus.DELIVERED, DeliveryStatus.DEAD, DeliveryStatus.SHADOW)
#: The stages a study goes through, for "not reached" messages.
_ORDER = ("received", "complete", "queued", "running", "inferred", "reported", "delivered")


@dataclass
class StudyResult:
    """What the audit says about one study."""

    study_state: str | None = None
    job_state: str | None = None
    job_error: str | None = None
    pipeline: str | None = None
    model_version: str | None = None
    job_key: str | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[tuple[str, str, str | None]] = field(default_factory=list)  # kind, uid, path
    last_received: datetime | None = None
    delivered_at: datetime | None = None
    committed: bool = False
    delivery_status: str | None = None
    delivery_error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.job_state == JobState.DELIVERED.value

    @property
    def stage(self) -> str:
        """The furthest stage reached."""
        if self.study_state is None:
            return "not received"
        if self.job_state is None:
            return "received" if self.study_state == StudyState.RECEIVING.value else "complete"
        return self.job_state

    def finished(self) -> bool:
        if self.study_state == StudyState.IGNORED.value:
            return True
        if self.job_state is None:
            return False
        if JobState(self.job_state) in _FINAL:
            return True
        return self.job_state == JobState.REPORTED.value and (
            self.delivery_status is not None
            and DeliveryStatus(self.delivery_status) in _DELIVERY_FINAL
        )


def read_results(config: Path, study_uids: list[str]) -> dict[str, StudyResult]:
    """Each study's result as the audit holds it now."""
    settings = load_settings(config)
    engine = make_engine(settings.database.url)
    try:
        with make_sessionmaker(engine)() as session:
            out: dict[str, StudyResult] = {}
            for uid in study_uids:
                res = StudyResult()
                out[uid] = res
                study = session.scalars(
                    select(Study).where(Study.study_instance_uid == uid)
                ).first()
                if study is None:
                    continue
                res.study_state = StudyState(study.state).value
                res.last_received = as_utc(study.last_received_at)
                job = session.scalars(
                    select(Job).where(Job.study_id == study.id).order_by(Job.id.desc())
                ).first()
                if job is None:
                    continue
                res.job_state = JobState(job.state).value
                res.job_error = job.error
                res.pipeline, res.model_version, res.job_key = (
                    job.pipeline,
                    job.model_version,
                    job.job_key,
                )
                for p in session.scalars(select(Prediction).where(Prediction.job_id == job.id)):
                    res.predictions.append(
                        {
                            "level": p.level,
                            "probability": p.probability,
                            "label": bool(p.label),
                            "threshold": p.threshold,
                            "aggregation": p.aggregation,
                        }
                    )
                for o in session.scalars(select(Output).where(Output.job_id == job.id)):
                    res.outputs.append((OutputKind(o.kind).value, o.sop_instance_uid, o.path))
                delivery = session.scalars(
                    select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)
                ).first()
                if delivery is not None:
                    res.delivery_status = DeliveryStatus(delivery.status).value
                    res.delivery_error = delivery.last_error
                    res.delivered_at = (
                        as_utc(delivery.delivered_at) if delivery.delivered_at else None
                    )
                    res.committed = delivery.committed_at is not None
            return out
    finally:
        engine.dispose()


def wait_results(
    config: Path, study_uids: list[str], timeout: float, procs: Processes
) -> dict[str, StudyResult]:
    """Poll the audit until every study is finished or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    console = Console()
    with console.status("waiting for the results") as status:
        while True:
            procs.check_alive("node")
            results = read_results(config, study_uids)
            stages = ", ".join(r.stage for r in results.values())
            status.update(f"waiting for the results: {stages}")
            if all(r.finished() for r in results.values()):
                return results
            if time.monotonic() > deadline:
                return results
            time.sleep(1.0)


def _decision(res: StudyResult) -> dict[str, Any] | None:
    for level in ("study", "subject"):
        for p in res.predictions:
            if p["level"] == level:
                return p
    return None


def _not_reached(res: StudyResult) -> str:
    """The first stage the study did not reach, with the reason when the audit has one."""
    if res.study_state is None:
        return "received (the node has no such study)"
    stage = res.stage
    if stage in _ORDER and stage != "delivered":
        nxt = _ORDER[_ORDER.index(stage) + 1]
        why = res.delivery_error or res.job_error or ""
        return f"{nxt} (stopped at {stage}{': ' + why if why else ''})"
    why = res.job_error or res.delivery_error or ""
    return f"delivered (job {stage}{': ' + why if why else ''})"


def report(
    console: Console,
    config: Path,
    run: Path,
    pacs: Pacs,
    studies: list[HeldOut],
    results: dict[str, StudyResult],
) -> None:
    """A table per study, where its results are, and the SR content tree in short."""
    data_dir = load_settings(config).data_dir
    for number, study in enumerate(studies, 1):
        res = results[study.study_uid]
        table = Table(
            title=f"study {number}: {study.modality}",
            show_header=False,
            title_justify="left",
        )
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("StudyInstanceUID", study.study_uid)
        decision = _decision(res)
        table.add_row("pipeline", f"{res.pipeline or '-'} (model {res.model_version or '-'})")
        if decision is not None:
            verdict = "positive" if decision["label"] else "negative"
            table.add_row("decision", f"[bold]{verdict}[/] (research use only)")
            table.add_row("probability", f"{decision['probability']:.3f}")
        else:
            table.add_row("decision", "-")
        thresholds = ", ".join(
            f"{p['level']} {p['threshold']:.3f}" for p in res.predictions if p["level"] != "slice"
        )
        table.add_row("thresholds", thresholds or "-")
        truth = "positive" if study.label else "negative"
        table.add_row("synthetic truth", truth + (f" ({study.side})" if study.label else ""))
        if res.delivered_at is not None and res.last_received is not None:
            seconds = (res.delivered_at - res.last_received).total_seconds()
            table.add_row("last instance → delivered", f"{seconds:.1f} s")
        table.add_row("stage reached", res.stage + (" (committed)" if res.committed else ""))
        if not res.delivered:
            table.add_row("not reached", f"[red]{_not_reached(res)}[/]")
        url = pacs.study_url(study.study_uid)
        places = []
        if url is not None:
            table.add_row("in Orthanc Explorer", "the link below")
            places.append(f"  in Orthanc Explorer: {url}")
        if pacs.kind == "storescp":
            places.append(f"  received by storescp in: {pacs.folder}")
        if res.job_key:
            table.add_row("SR and captures", "the folder below")
            places.append(f"  SR and captures: {data_dir / 'outputs' / res.job_key}")
        held = pacs.held(study.study_uid)
        if held:
            table.add_row(
                "the PACS holds", ", ".join(f"{h['modality']} ×{h['instances']}" for h in held)
            )
        console.print(table)
        for line in places:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    sr = first_sr(config, results)
    if sr is not None:
        console.print(f"[bold]SR content tree[/] ({sr.name}, in short):")
        console.print(sr_tree(sr), markup=False, highlight=False)


def first_sr(config: Path, results: dict[str, StudyResult]) -> Path | None:
    """The file of the first SR the node wrote."""
    data_dir = load_settings(config).data_dir
    for res in results.values():
        for kind, _uid, path in res.outputs:
            if kind == OutputKind.SR.value and path:
                full = Path(path) if Path(path).is_absolute() else data_dir / path
                if full.is_file():
                    return full
    return None


#: Content items left out of the short SR tree (provenance kept in the file).
_SR_NOISE = (
    '"Algorithm Parameters"',
    '"Tracking Unique Identifier"',
    '"Device Observer',
    '"Language of Content',
)


def sr_tree(path: Path, max_lines: int = 28) -> str:
    """The SR content tree, short: ``dsrdump`` when installed, else a pydicom walk."""
    dsrdump = shutil.which("dsrdump")
    if dsrdump is not None:
        done = subprocess.run(
            [dsrdump, "-Ph", str(path)], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            return f"dsrdump failed: {done.stderr.strip()[-300:]}"
        lines = done.stdout.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.startswith("<")), 0)
        lines = [ln for ln in lines[start:] if not any(n in ln for n in _SR_NOISE)]
    else:
        import pydicom

        lines = []

        def walk(items: Any, depth: int) -> None:
            for item in items:
                name = (
                    item.ConceptNameCodeSequence[0].CodeMeaning
                    if "ConceptNameCodeSequence" in item
                    else ""
                )
                value = ""
                if "TextValue" in item:
                    value = f' = "{item.TextValue}"'
                elif "ConceptCodeSequence" in item:
                    value = f" = {item.ConceptCodeSequence[0].CodeMeaning}"
                elif "MeasuredValueSequence" in item and item.MeasuredValueSequence:
                    value = f" = {item.MeasuredValueSequence[0].NumericValue}"
                lines.append(f"{'  ' * depth}<{item.ValueType}> {name}{value}")
                if "ContentSequence" in item:
                    walk(item.ContentSequence, depth + 1)

        ds = pydicom.dcmread(path)
        walk([ds], 0)
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


def truth_and_metrics(
    console: Console, procs: Processes, config: Path, run: Path, studies: list[HeldOut], log: Path
) -> None:
    """``sijnode audit truth import`` of the synthetic labels, then ``audit metrics``."""
    truth = run / "truth.csv"
    with truth.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_instance_uid", "label", "reader_id"])
        for s in studies:
            writer.writerow([s.study_uid, s.label, "synth"])
    importing = sijnode_command(config, "audit", "truth", "import", str(truth))
    procs.run("audit truth import", importing, log, 120)
    cmd = sijnode_command(config, "audit", "metrics", "--resamples", "200")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    console.print("[bold]sijnode audit metrics[/] (the demo's studies, synthetic truth):")
    if done.returncode != 0:
        console.print(f"[red]audit metrics failed:[/] {done.stderr.strip()[-800:]}")
    else:
        console.print(done.stdout.rstrip(), markup=False, highlight=False)


def overview(
    path: Path, config: Path, studies: list[HeldOut], results: dict[str, StudyResult]
) -> Path | None:
    """``overview.png``: each explained slice beside its Grad-CAM capture, with the decision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pydicom

    data_dir = load_settings(config).data_dir
    rows: list[tuple[str, list[tuple[Any, Any | None]]]] = []
    for number, study in enumerate(studies, 1):
        res = results[study.study_uid]
        sources = {}
        for f in study.files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            sources[str(ds.SOPInstanceUID)] = f
        pairs: list[tuple[Any, Any | None]] = []
        for kind, _uid, stored in res.outputs:
            if kind != OutputKind.SC.value or not stored:
                continue
            sc = pydicom.dcmread(stored if Path(stored).is_absolute() else data_dir / stored)
            ref = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
            if ref not in sources:
                continue
            image = pydicom.dcmread(sources[ref]).pixel_array.astype(np.float32)
            pairs.append((image, sc.pixel_array))
        if not pairs and study.files:
            middle = study.files[len(study.files) // 2]
            pairs.append((pydicom.dcmread(middle).pixel_array.astype(np.float32), None))
        decision = _decision(res)
        if decision is not None:
            verdict = "positive" if decision["label"] else "negative"
            title = (
                f"study {number} {study.modality}: {verdict} p={decision['probability']:.2f} "
                f"(threshold {decision['threshold']:.2f}); truth "
                f"{'positive' if study.label else 'negative'}"
            )
        else:
            title = f"study {number} {study.modality}: no result ({_not_reached(res)})"
        rows.append((title, pairs))
    if not any(cam is not None for _, pairs in rows for _, cam in pairs):
        return None
    columns = max(2, 2 * max(len(p) for _, p in rows))
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(2.2 * columns, 2.8 * len(rows)), squeeze=False
    )
    for r, (title, pairs) in enumerate(rows):
        for c in range(columns):
            axes[r][c].axis("off")
        for i, (src, cam) in enumerate(pairs):
            lo, hi = np.percentile(src, (1, 99))
            axes[r][2 * i].imshow(np.clip((src - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
            axes[r][2 * i].set_title("slice", fontsize=8)
            if cam is None:
                axes[r][2 * i].set_title("middle slice", fontsize=8)
                axes[r][2 * i + 1].text(
                    0.05,
                    0.5,
                    "no Grad-CAM capture\nfor this study",
                    fontsize=8,
                    transform=axes[r][2 * i + 1].transAxes,
                )
                continue
            axes[r][2 * i + 1].imshow(cam)
            flat = cam.ndim == 3 and bool(np.all(np.abs(cam[..., 0].astype(int) - cam[..., 1]) < 8))
            label = "Grad-CAM capture" + ("\n(flat map: no heat)" if flat else "")
            axes[r][2 * i + 1].set_title(label, fontsize=8)
        axes[r][0].text(
            0, 1.3, title, transform=axes[r][0].transAxes, fontsize=9, fontweight="bold"
        )
    fig.suptitle("sijnode demo: synthetic studies, research use only", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, hspace=0.6, wspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def timings(console: Console, stages: dict[str, float]) -> None:
    """Seconds per demo stage."""
    table = Table(title="demo timings", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in stages.items():
        table.add_row(name, f"{seconds:.1f}")
    table.add_row("[bold]total[/]", f"[bold]{sum(stages.values()):.1f}[/]")
    console.print(table)
