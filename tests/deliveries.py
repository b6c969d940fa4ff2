"""Results to deliver, a job that owns them, and real peers that receive them.

Developer E's report builders are not on this branch, so the objects are made here with
highdicom from a synthetic study (sijnode.synth): Grad-CAM-like secondary captures and a
small TID 1500 Comprehensive SR that references the source images and the captures.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy.orm import Session, sessionmaker

from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.db.lifecycle import transition
from sijnode.db.migrate import upgrade
from sijnode.db.records import record_output, record_prediction
from sijnode.db.schema import Job, JobState, OutputKind, Study
from sijnode.settings import Settings, load_settings
from sijnode.synth import generate_mr_study
from tests.conftest import require_tool
from tests.nodes import deep_merge

UID_ROOT = "2.25.4242."


@dataclass
class Results:
    """A source study and the objects made for it (files on disk)."""

    source: list[Dataset]
    files: list[Path]
    sop_instance_uids: list[str]
    study_instance_uid: str


def make_results(
    out_dir: Path, seed: int = 7, n_captures: int = 2, source: list[Dataset] | None = None
) -> Results:
    """``n_captures`` secondary captures and one Comprehensive SR for ``source`` (by
    default a small synthetic MR study)."""
    if source is None:
        source = generate_mr_study(seed, 1, positive=True, n_slices=4, uid_root=UID_ROOT).datasets
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    captures = []
    sc_series = generate_uid(prefix=UID_ROOT)
    for i, ref in enumerate(source[:n_captures]):
        rgb = np.zeros((int(ref.Rows), int(ref.Columns), 3), dtype=np.uint8)
        rgb[..., 0] = 200
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=sc_series,
            sop_instance_uid=generate_uid(prefix=UID_ROOT),
            series_number=901,
            instance_number=i + 1,
            manufacturer="sijnode-tests",
            patient_orientation=("L", "P"),
            laterality="R",
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        path = out_dir / f"sc{i}.dcm"
        sc.save_as(path, enforce_file_format=True)
        captures.append(sc)
        files.append(path)
    sr = _report(source, captures)
    sr_path = out_dir / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    files.append(sr_path)
    uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    return Results(source, files, uids, str(source[0].StudyInstanceUID))


def _report(source: list[Dataset], captures: list[Dataset]) -> hd.sr.ComprehensiveSR:
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=UID_ROOT), name="sijnode-tests"
        ),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(prefix=UID_ROOT), identifier="decision"
        ),
        measurements=[
            hd.sr.Measurement(
                name=hd.sr.CodedConcept("122157", "DCM", "Probability"),
                value=0.87,
                unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
            )
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
        imaging_measurements=[group],
    )
    return hd.sr.ComprehensiveSR(
        evidence=[*source, *captures],
        content=report,
        series_instance_uid=generate_uid(prefix=UID_ROOT),
        series_number=902,
        sop_instance_uid=generate_uid(prefix=UID_ROOT),
        instance_number=1,
        manufacturer="sijnode-tests",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="AI sacroiliitis result (research use)",
    )


def delivery_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings on a migrated SQLite audit in ``tmp_path``, fast backoff."""
    base: dict[str, Any] = {
        "data_dir": str(tmp_path),
        "database": {"url": f"sqlite:///{tmp_path / 'audit.db'}", "pseudonym_secret": "t"},
        "storage": {"spool_dir": str(tmp_path / "spool"), "min_free_mb": 1},
        "node": {"ae_title": "SIJNODE", "bind_address": "127.0.0.1", "uid_root": UID_ROOT},
        "metrics": {"port": 0},
        "delivery": {"backoff_seconds": 5.0, "max_attempts": 3},
    }
    settings = load_settings(overrides=deep_merge(base, overrides))
    upgrade(settings.database.url)
    return settings


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """A fresh engine and sessions on the settings' audit (a "restarted" process)."""
    return make_sessionmaker(make_engine(settings.database.url))


def seed_job(
    settings: Settings,
    sessions: sessionmaker[Session],
    results: Results,
    *,
    route: str = "mr-sij",
    label: bool = True,
    shadow: bool = False,
) -> int:
    """A reported MR job with its prediction and outputs recorded; the first source slice
    is written to the spool (the webhook reads the accession number from it)."""
    spool = settings.storage.spool_dir / "src0.dcm"
    spool.parent.mkdir(parents=True, exist_ok=True)
    results.source[0].save_as(spool, enforce_file_format=True)
    with transaction(sessions) as s:
        study = Study(study_instance_uid=results.study_instance_uid, site="test")
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            job_key=f"job-{results.study_instance_uid[-12:]}",
            route=route,
            pipeline="mr",
            model_version="mr-test-1.0",
            spool_paths=["src0.dcm"],
            shadow=shadow,
        )
        s.add(job)
        s.flush()
        transition(s, job, JobState.RUNNING)  # the lifecycle: queued → running → inferred
        transition(s, job, JobState.INFERRED)
        record_prediction(s, job, 0.87 if label else 0.1, label, 0.5, level="subject")
        for path in results.files:
            ds = dcmread(path, stop_before_pixels=True)
            kind = OutputKind.SR if "88." in str(ds.SOPClassUID) else OutputKind.SC
            record_output(
                s, job, kind, ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, str(path)
            )
        transition(s, job, JobState.REPORTED)
        return job.id


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


@contextmanager
def storescp(port: int, out_dir: Path, ae_title: str = "DEST") -> Iterator[Path]:
    """DCMTK ``storescp`` writing every received object to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", ae_title, "-od", str(out_dir), "-uf", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port)
        yield out_dir
    finally:
        proc.terminate()
        proc.wait(10)


def received(out_dir: Path) -> list[Dataset]:
    """Every object storescp wrote (one file per C-STORE)."""
    return [dcmread(p) for p in sorted(out_dir.iterdir()) if p.is_file()]


@contextmanager
def pynetdicom_scp(
    port: int,
    sop_classes: list[str],
    status: Callable[[Dataset], int] = lambda _ds: 0x0000,
    ae_title: str = "DEST",
) -> Iterator[list[Dataset]]:
    """A pynetdicom Storage SCP that supports only ``sop_classes`` and answers each
    C-STORE with ``status(dataset)``; yields the datasets it was sent (all, any status)."""
    got: list[Dataset] = []
    lock = threading.Lock()

    def handle(event: Any) -> int:
        ds = event.dataset
        with lock:
            got.append(ds)
        return status(ds)

    ae = AE(ae_title=ae_title)
    for uid in sop_classes:
        ae.add_supported_context(uid)
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)]
    )
    try:
        yield got
    finally:
        server.shutdown()
