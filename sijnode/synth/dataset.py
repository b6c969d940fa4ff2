"""Synthetic data sets on disk: one folder per study, ``labels.csv`` and ``rois.csv``.

The two CSV files are the formats the training tools read, from synthetic and real data
alike; ``docs/synth.md`` documents them column by column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from sijnode import __version__
from sijnode.errors import SynthesisError
from sijnode.synth.ct import MAX_SLICES as CT_MAX_SLICES
from sijnode.synth.ct import generate_ct_study
from sijnode.synth.mr import MAX_SLICES as MR_MAX_SLICES
from sijnode.synth.mr import MIN_SLICES as MR_MIN_SLICES
from sijnode.synth.mr import generate_mr_study
from sijnode.synth.subject import check_counts, check_uid_root, random_side, stream
from sijnode.synth.truth import Side, SynthStudy, sides_of
from sijnode.uids import DEFAULT_UID_ROOT

LABELS_FILE = "labels.csv"
ROIS_FILE = "rois.csv"
MANIFEST_FILE = "synth.json"
LABEL_COLUMNS = (
    "subject",
    "modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "label",
    "side",
    "slices",
    "slice_labels",
    "slice_sides",
    "folder",
)
ROI_COLUMNS = (
    "subject",
    "modality",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "slice_label",
    "side",
    "side_label",
    "x0",
    "y0",
    "x1",
    "y1",
)
ModalityChoice = Literal["ct", "mr", "both"]
_SIDE_LETTER = {"none": "n", "left": "l", "right": "r", "both": "b"}


@dataclass(frozen=True)
class PlannedSubject:
    """Subject-level truth decided before any image is made."""

    index: int
    positive: bool
    side: Side


def plan_subjects(seed: int, n_subjects: int, positive_fraction: float) -> list[PlannedSubject]:
    """Which subjects are positive (exactly round(fraction × n), chosen by the seed) and where."""
    if not 1 <= n_subjects <= 9999:
        raise SynthesisError(f"expected 1 to 9999 subjects, got {n_subjects}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise SynthesisError(f"expected a positive fraction from 0 to 1, got {positive_fraction}")
    check_counts(seed, 1)
    n_positive = int(np.floor(positive_fraction * n_subjects + 0.5))
    order = stream(seed, 0, "plan").permutation(n_subjects)
    positive = {int(i) + 1 for i in order[:n_positive]}
    return [
        PlannedSubject(i, i in positive, random_side(seed, i) if i in positive else "none")
        for i in range(1, n_subjects + 1)
    ]


def generate_dataset(
    seed: int,
    n_subjects: int,
    positive_fraction: float = 0.5,
    modality: ModalityChoice = "both",
    n_slices: int | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> Iterator[SynthStudy]:
    """Studies of every planned subject, CT before MR; one at a time to bound memory.

    ``n_slices`` None gives 24 CT slices and 20-37 MR slices per subject. Parameters are
    checked here, before any study is made.
    """
    if modality not in ("ct", "mr", "both"):
        raise SynthesisError(f"expected modality ct, mr or both, got {modality!r}")
    check_uid_root(uid_root)
    want_ct, want_mr = modality in ("ct", "both"), modality in ("mr", "both")
    if n_slices is not None and want_ct and not 1 <= n_slices <= CT_MAX_SLICES:
        raise SynthesisError(f"expected 1 to {CT_MAX_SLICES} CT slices, got {n_slices}")
    if n_slices is not None and want_mr and not MR_MIN_SLICES <= n_slices <= MR_MAX_SLICES:
        raise SynthesisError(
            f"expected {MR_MIN_SLICES} to {MR_MAX_SLICES} MR slices, got {n_slices}"
        )
    plan = plan_subjects(seed, n_subjects, positive_fraction)

    def studies() -> Iterator[SynthStudy]:
        for subject in plan:
            if want_ct:
                yield generate_ct_study(
                    seed, subject.index, subject.positive, subject.side, n_slices or 24, uid_root
                )
            if want_mr:
                yield generate_mr_study(
                    seed, subject.index, subject.positive, subject.side, n_slices, uid_root
                )

    return studies()


def study_folder(study: SynthStudy) -> PurePosixPath:
    """Folder of a study relative to the data set: ``<subject>/<modality>`` (no identifiers)."""
    return PurePosixPath(study.subject_id, study.modality.lower())


def write_study(study: SynthStudy, out_dir: Path) -> Path:
    """Write the study's slices as ``<out>/<subject>/<modality>/NNNN.dcm`` (InstanceNumber)."""
    folder = out_dir / study_folder(study)
    folder.mkdir(parents=True, exist_ok=False)
    for ds in study.datasets:
        ds.save_as(folder / f"{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)
    return folder


def label_row(study: SynthStudy) -> dict[str, str]:
    """The ``labels.csv`` row of one study."""
    return {
        "subject": study.subject_id,
        "modality": study.modality,
        "StudyInstanceUID": study.study_instance_uid,
        "SeriesInstanceUID": study.series_instance_uid,
        "label": str(study.label),
        "side": study.side,
        "slices": str(len(study.slices)),
        "slice_labels": study.slice_labels,
        "slice_sides": "".join(_SIDE_LETTER[s.side] for s in study.slices),
        "folder": str(study_folder(study)),
    }


def roi_rows(study: SynthStudy) -> list[dict[str, str]]:
    """The ``rois.csv`` rows of one study: one per slice and iliac box."""
    rows = []
    for sl in study.slices:
        for box in sl.rois:
            rows.append(
                {
                    "subject": study.subject_id,
                    "modality": study.modality,
                    "StudyInstanceUID": study.study_instance_uid,
                    "SeriesInstanceUID": study.series_instance_uid,
                    "SOPInstanceUID": sl.sop_instance_uid,
                    "InstanceNumber": str(sl.instance_number),
                    "slice_label": str(sl.label),
                    "side": box.side,
                    "side_label": str(int(box.side in sides_of(sl.side))),
                    "x0": str(box.x0),
                    "y0": str(box.y0),
                    "x1": str(box.x1),
                    "y1": str(box.y1),
                }
            )
    return rows


@dataclass(frozen=True)
class DatasetManifest:
    """What :func:`write_dataset` wrote."""

    out_dir: Path
    labels_csv: Path
    rois_csv: Path
    labels: tuple[dict[str, str], ...]


def _writer(handle: object, columns: tuple[str, ...]) -> csv.DictWriter[str]:
    writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")  # type: ignore[arg-type]
    writer.writeheader()
    return writer


def write_dataset(
    out_dir: Path, studies: Iterable[SynthStudy], parameters: dict[str, object] | None = None
) -> DatasetManifest:
    """Write ``studies`` under ``out_dir`` (new or empty) with labels.csv, rois.csv, synth.json.

    ``parameters`` (the generation settings) go into synth.json for provenance; nothing in
    the output depends on the clock, so the same studies give the same bytes.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SynthesisError(f"expected a new or empty output directory, got {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels: list[dict[str, str]] = []
    with (
        open(out_dir / LABELS_FILE, "w", newline="", encoding="utf-8") as labels_handle,
        open(out_dir / ROIS_FILE, "w", newline="", encoding="utf-8") as rois_handle,
    ):
        label_writer = _writer(labels_handle, LABEL_COLUMNS)
        roi_writer = _writer(rois_handle, ROI_COLUMNS)
        for study in studies:
            write_study(study, out_dir)
            row = label_row(study)
            label_writer.writerow(row)
            roi_writer.writerows(roi_rows(study))
            labels.append(row)
    manifest = {"generator": f"sijnode {__version__}", "parameters": parameters or {}}
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return DatasetManifest(out_dir, out_dir / LABELS_FILE, out_dir / ROIS_FILE, tuple(labels))
