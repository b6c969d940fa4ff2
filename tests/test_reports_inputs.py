"""Test inputs for the report builders: synthetic studies and hand-made pipeline results.

The studies come from ``sijnode.synth`` (real CT and MR Image IODs); the results are built
by hand from their headers and known truth: a score per slice, a Gaussian blob heatmap on
each explained slice centred on its lesion (or ROI), and a box around the blob's peak.
They are input data; what the tests check is the builders. The tests at the end check
only that these inputs are what the report tests assume.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from sijnode.models.result import (
    AlgorithmIdentity,
    Decision,
    Explanation,
    Finding,
    PipelineResult,
    Region,
    SliceResult,
)
from sijnode.synth import SynthStudy, generate_ct_study, generate_mr_study, write_study
from tests.conftest import require_tool

SEED = 20240611
#: Half size of the box around the heatmap peak, in pixels.
BOX_HALF = 24
_SIDE = {"both": "B", "right": "R", "left": "L", "none": None}


@dataclass
class Case:
    """A study written to disk and the pipeline result for it."""

    study: SynthStudy
    paths: list[Path]
    result: PipelineResult
    job_key: str

    @property
    def headers(self) -> list[Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in self.paths]


def gaussian_blob(rows: int, columns: int, row: float, column: float, sigma: float) -> np.ndarray:
    """uint8 heatmap with its maximum 255 at (row, column)."""
    r, c = np.mgrid[0:rows, 0:columns].astype(np.float32)
    blob = np.exp(-((r - row) ** 2 + (c - column) ** 2) / (2 * sigma**2))
    return np.rint(blob / blob.max() * 255).astype(np.uint8)


def peak_region(heatmap: np.ndarray) -> Region:
    """A box of 2*BOX_HALF pixels around the heatmap's maximum, clipped to the image."""
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    rows, columns = heatmap.shape
    return Region(
        column0=float(max(0, column - BOX_HALF)),
        row0=float(max(0, row - BOX_HALF)),
        column1=float(min(columns, column + BOX_HALF)),
        row1=float(min(rows, row + BOX_HALF)),
    )


def _algorithm(pipeline: str) -> AlgorithmIdentity:
    sha = "3f2a9c0d5e6b7a8190ab12cd34ef5678" * 2
    arch = "resnext50_32x4d" if pipeline == "ct" else "resnet18"
    return AlgorithmIdentity(
        name=f"sijnode-{pipeline}-{arch}",
        version=f"{pipeline}-{sha[:12]}",
        parameters={"architecture": arch, "weights_sha256": sha, "input_size": "224"},
    )


def make_result(
    study: SynthStudy,
    n_explained: int = 3,
    decision: Decision | None = None,
    laterality_per_slice: bool = False,
) -> PipelineResult:
    """A plausible result of ``study`` from its truth (scores high on lesion slices)."""
    ct = study.modality == "CT"
    rng = np.random.default_rng(study.subject_index)
    slices = []
    for i, (ds, truth) in enumerate(zip(study.datasets, study.slices, strict=True)):
        score = float(np.clip((0.8 if truth.label else 0.1) + rng.normal(0, 0.05), 0, 1))
        slices.append(
            SliceResult(
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                position_index=i,
                instance_number=int(ds.InstanceNumber),
                score=score,
                filtered_score=score,
                positive=score >= 0.5,
            )
        )
    ranked = sorted(range(len(slices)), key=lambda i: -slices[i].score)[:n_explained]
    explanations = []
    for i in sorted(ranked):
        ds = study.datasets[i]
        rows, columns = int(ds.Rows), int(ds.Columns)
        lesion = np.nonzero(study.lesion[i])
        if lesion[0].size:
            # the side of the image with more lesion pixels
            left = lesion[1] >= columns / 2
            keep = left if left.sum() >= (~left).sum() else ~left
            lesion = (lesion[0][keep], lesion[1][keep])
            row, column = float(np.mean(lesion[0])), float(np.mean(lesion[1]))
        elif study.slices[i].rois:
            box = study.slices[i].rois[0]
            row, column = (box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2
        else:
            row, column = rows / 2, columns / 2
        heatmap = gaussian_blob(rows, columns, row, column, sigma=rows / 25)
        side = "L" if column > columns / 2 else "R"
        explanations.append(
            Explanation(
                sop_instance_uid=slices[i].sop_instance_uid,
                series_instance_uid=slices[i].series_instance_uid,
                position_index=i,
                instance_number=slices[i].instance_number,
                score=slices[i].score,
                heatmap=heatmap,
                peak_region=peak_region(heatmap),
                laterality=side if laterality_per_slice else None,
            )
        )
    probability = max(s.score for s in slices)
    if decision is None:
        decision = Decision.PRESENT if probability >= 0.5 else Decision.ABSENT
    return PipelineResult(
        pipeline="ct" if ct else "mr",
        finding=Finding.SACROILIITIS if ct else Finding.ACTIVE_SACROILIITIS_BME,
        decision=decision,
        probability=probability,
        threshold=0.5,
        slice_threshold=0.5,
        aggregation="max" if ct else "median-filter-mean",
        aggregation_parameters={} if ct else {"kernel": 3},
        study_instance_uid=study.study_instance_uid,
        slices=tuple(slices),
        explanations=tuple(explanations),
        algorithm=_algorithm("ct" if ct else "mr"),
        device="cpu",
        precision="fp32",
        stage_seconds={"infer": 0.1},
        laterality=_SIDE[study.side],
        reason="no plausible SI joint found" if decision is Decision.INDETERMINATE else None,
    )


def ct_case(tmp: Path, n_slices: int = 12, subject: int = 1, **kwargs: object) -> Case:
    """A positive synthetic CT study on disk and its result."""
    study = generate_ct_study(SEED, subject, True, n_slices=n_slices)
    folder = write_study(study, tmp)
    paths = sorted(folder.glob("*.dcm"))
    return Case(study, paths, make_result(study, **kwargs), job_key=f"ct-job-{subject}")  # type: ignore[arg-type]


def mr_case(tmp: Path, subject: int = 2, **kwargs: object) -> Case:
    """A positive synthetic MR study on disk and its result (laterality per slice)."""
    study = generate_mr_study(SEED, subject, True, n_slices=20)
    folder = write_study(study, tmp)
    paths = sorted(folder.glob("*.dcm"))
    kwargs.setdefault("laterality_per_slice", True)
    return Case(study, paths, make_result(study, **kwargs), job_key=f"mr-job-{subject}")  # type: ignore[arg-type]


def test_inputs_are_consistent(tmp_path: Path) -> None:
    for case in (ct_case(tmp_path / "ct"), mr_case(tmp_path / "mr")):
        result = case.result
        assert len(result.explanations) == 3
        assert {h.StudyInstanceUID for h in case.headers} == {result.study_instance_uid}
        for e in result.explanations:
            row, column = np.unravel_index(int(np.argmax(e.heatmap)), e.heatmap.shape)
            r = e.peak_region
            assert r.column0 <= column < r.column1 and r.row0 <= row < r.row1
            assert e.heatmap.max() == 255


@dataclass(frozen=True)
class Validation:
    """What ``dciodvfy`` said about one file."""

    errors: list[str]
    warnings: list[str]


def dciodvfy(path: Path) -> Validation:
    """Run dicom3tools' ``dciodvfy`` on ``path`` and sort its lines (it exits 0 either way)."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    return Validation(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
    )


def assert_valid(paths: list[Path]) -> dict[str, list[str]]:
    """Zero dciodvfy errors on every file; returns the warnings per file (for the report)."""
    errors = {p.name: v.errors for p in paths if (v := dciodvfy(p)).errors}
    assert errors == {}, errors
    return {p.name: w for p in paths if (w := dciodvfy(p).warnings)}


def assert_round_trip(ds: Dataset, path: Path) -> Dataset:
    """``ds`` written to ``path`` reads back with the same elements and the same meta."""
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert [e.tag for e in back] == [e.tag for e in ds]
    assert _comparable(back) == _comparable(ds)
    return back


def _comparable(ds: Dataset) -> dict[str, object]:
    """The dataset as DICOM JSON (PS3.18 F.2), binary values replaced by their hash."""
    data = ds.to_json_dict(
        bulk_data_threshold=1,
        bulk_data_element_handler=lambda e: hashlib.sha256(e.value).hexdigest(),
    )
    text = json.dumps(data, default=str, sort_keys=True)  # DA, DT, TM values as written
    loaded: dict[str, object] = json.loads(text)
    return loaded
