"""Read and check a labelled data set: ``labels.csv``, ``rois.csv`` and the DICOM folders.

The formats are the ones ``sijnode synth`` writes (docs/synth.md); a site exports the same
columns from a reading session. Every problem is collected, with its file or line and the
reason, and reported together *before* any training starts.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sijnode.errors import TrainingDataError

Modality = Literal["CT", "MR"]

LABEL_COLUMNS = ("subject", "modality", "StudyInstanceUID", "SeriesInstanceUID", "label", "folder")
ROI_COLUMNS = (
    "subject",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "side",
    "x0",
    "y0",
    "x1",
    "y1",
)


@dataclass(frozen=True)
class RoiAnnotation:
    """One iliac-bone box on one slice (half-open pixels ``[y0:y1, x0:x1]``)."""

    side: Literal["left", "right"]
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class SliceRecord:
    """One slice of a labelled series, in InstanceNumber order (as ``slice_labels``)."""

    path: Path
    instance_number: int
    sop_instance_uid: str
    label: int | None
    rois: tuple[RoiAnnotation, ...] = ()


@dataclass(frozen=True)
class StudyRecord:
    """One labelled study (one series) of one subject."""

    subject: str
    modality: Modality
    study_instance_uid: str
    series_instance_uid: str
    label: int
    folder: Path
    slices: tuple[SliceRecord, ...] = field(default_factory=tuple)

    @property
    def has_slice_labels(self) -> bool:
        return all(s.label is not None for s in self.slices) and bool(self.slices)


def _read_csv(path: Path, required: Iterable[str], problems: list[str]) -> list[dict[str, str]]:
    if not path.is_file():
        problems.append(f"{path}: file not found")
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            problems.append(f"{path}:1: missing column(s) {', '.join(missing)}")
            return []
        return list(reader)


def _int(value: str, where: str, what: str, problems: list[str]) -> int | None:
    try:
        return int(value)
    except ValueError:
        problems.append(f"{where}: {what} must be an integer, got {value!r}")
        return None


def _slice_headers(
    folder: Path, where: str, problems: list[str]
) -> list[tuple[Path, int, str, str]]:
    """(path, InstanceNumber, SOPInstanceUID, SeriesInstanceUID) of every file in ``folder``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: list[tuple[Path, int, str, str]] = []
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        problems.append(f"{where}: folder {folder} has no DICOM files")
        return out
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            number = int(ds.InstanceNumber)
            out.append((path, number, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
        except (InvalidDicomError, OSError, AttributeError, ValueError, TypeError) as exc:
            problems.append(f"{path}: unreadable DICOM file ({exc})")
    return sorted(out, key=lambda item: item[1])


def has_pair(boxes: Iterable[RoiAnnotation]) -> bool:
    """Whether a slice's boxes are exactly one left and one right iliac box."""
    sides = [b.side for b in boxes]
    return sorted(sides) == ["left", "right"]


def _pair_problems(
    where: str, headers: list[tuple[Path, int, str, str]], rois: dict[str, list[RoiAnnotation]]
) -> list[str]:
    """Edge slices may lack the pair; any other slice without both boxes is a problem.

    Slices beyond the joint, at either end of the series (InstanceNumber order), show at
    most one ilium in the joint's extent: such leading and trailing slices may have one or
    no box and are left out of MR training (no two-sided ROI patch). A slice between two
    annotated pairs without both boxes is a missing annotation, as is a series with no pair
    or a side annotated twice.
    """
    paired = [has_pair(rois.get(sop, ())) for _, _, sop, _ in headers]
    if not any(paired):
        return [f"{where}: missing ROI boxes: no slice has both iliac boxes in rois.csv"]
    first = paired.index(True)
    last = len(paired) - 1 - paired[::-1].index(True)
    out = []
    for k, (_, number, sop, _) in enumerate(headers):
        sides = sorted(b.side for b in rois.get(sop, ()))
        if len(sides) != len(set(sides)):
            out.append(f"{where}: slice InstanceNumber {number} has {sides} boxes in rois.csv")
        elif first < k < last and not paired[k]:
            out.append(
                f"{where}: missing ROI box(es) for slice InstanceNumber {number} "
                f"(expected left and right in rois.csv, found {sides}; only slices at the "
                "ends of the series may lack the pair)"
            )
    return out


def load_dataset(root: Path, modality: Modality, need_rois: bool = False) -> list[StudyRecord]:
    """The labelled studies of ``modality`` under ``root``; raises if anything is wrong.

    Checks: both CSV files readable with their columns; each label row's folder holds
    readable DICOM files of the named series; ``slice_labels`` has one character per slice;
    for MR with ``need_rois``, every slice between the series' first and last annotated pair
    has both iliac boxes (edge slices may lack them: :func:`_pair_problems`); both classes
    have examples.
    """
    problems: list[str] = []
    labels_path = root / "labels.csv"
    rows = _read_csv(labels_path, LABEL_COLUMNS, problems)
    rois: dict[str, list[RoiAnnotation]] = defaultdict(list)
    if need_rois:
        rois_path = root / "rois.csv"
        for line, row in enumerate(_read_csv(rois_path, ROI_COLUMNS, problems), start=2):
            where = f"{rois_path}:{line}"
            coords = [_int(row[k], where, k, problems) for k in ("x0", "y0", "x1", "y1")]
            if row["side"] not in ("left", "right"):
                problems.append(f"{where}: side must be left or right, got {row['side']!r}")
                continue
            if any(c is None for c in coords):
                continue
            x0, y0, x1, y1 = (int(c) for c in coords)  # type: ignore[arg-type]
            if x1 <= x0 or y1 <= y0:
                problems.append(f"{where}: empty box ({x0}, {y0}, {x1}, {y1})")
                continue
            rois[row["SOPInstanceUID"]].append(RoiAnnotation(row["side"], x0, y0, x1, y1))  # type: ignore[arg-type]
    studies: list[StudyRecord] = []
    for line, row in enumerate(rows, start=2):
        where = f"{labels_path}:{line}"
        if row["modality"] != modality:
            continue
        label = _int(row["label"], where, "label", problems)
        if label not in (0, 1):
            if label is not None:
                problems.append(f"{where}: label must be 0 or 1, got {label}")
            continue
        folder = root / row["folder"]
        headers = _slice_headers(folder, where, problems)
        series = {h[3] for h in headers}
        if headers and series != {row["SeriesInstanceUID"]}:
            problems.append(
                f"{where}: label matches no series: expected SeriesInstanceUID "
                f"{row['SeriesInstanceUID']} in {row['folder']}, found {sorted(series)}"
            )
            continue
        slice_labels = (row.get("slice_labels") or "").strip()
        if slice_labels and len(slice_labels) != len(headers):
            problems.append(
                f"{where}: slice_labels has {len(slice_labels)} characters, expected one per "
                f"slice ({len(headers)})"
            )
            continue
        if slice_labels and set(slice_labels) - {"0", "1"}:
            problems.append(f"{where}: slice_labels may hold only 0 and 1, got {slice_labels!r}")
            continue
        slices = []
        if need_rois:
            problems += _pair_problems(where, headers, rois)
        for index, (path, number, sop_uid, _series) in enumerate(headers):
            boxes = tuple(sorted(rois.get(sop_uid, ()), key=lambda b: b.side))
            slices.append(
                SliceRecord(
                    path=path,
                    instance_number=number,
                    sop_instance_uid=sop_uid,
                    label=int(slice_labels[index]) if slice_labels else None,
                    rois=boxes,
                )
            )
        studies.append(
            StudyRecord(
                subject=row["subject"],
                modality=modality,
                study_instance_uid=row["StudyInstanceUID"],
                series_instance_uid=row["SeriesInstanceUID"],
                label=label,
                folder=folder,
                slices=tuple(slices),
            )
        )
    if rows and not problems:
        classes = {s.label for s in studies}
        for missing_class in {0, 1} - classes:
            problems.append(f"{labels_path}: no {modality} study with label {missing_class}")
    if not rows and not problems:
        problems.append(f"{labels_path}: no label rows")
    if problems:
        raise TrainingDataError(problems)
    return studies
