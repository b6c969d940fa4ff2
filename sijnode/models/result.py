"""What a pipeline returns for one job: the contract between classify, report and record.

A pipeline (``models/ct.py``, ``models/mr.py``) builds a :class:`PipelineResult`; the worker
records it through ``db/`` and hands it to the report builders (``reports/``). Nothing here
imports ``db/`` or torch. Heatmaps are compact uint8 arrays in the source slice's geometry
and are never stored in the database (they travel in an ``.npz`` beside the job's outputs).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


class Decision(enum.StrEnum):
    """The qualitative result of a study or subject (SR: Present, Absent, Indeterminate)."""

    PRESENT = "present"
    ABSENT = "absent"
    INDETERMINATE = "indeterminate"


class Finding(enum.StrEnum):
    """What a pipeline looks for (reports post-coordinate it from verified codes only)."""

    #: CT (Fu et al. 2024): sacroiliitis = inflammation at the sacroiliac joint.
    SACROILIITIS = "sacroiliitis"
    #: MR (Lee et al. 2021): active sacroiliitis = bone-marrow oedema at the SI joint.
    ACTIVE_SACROILIITIS_BME = "active_sacroiliitis_bme"


@dataclass(frozen=True)
class AlgorithmIdentity:
    """TID 4019 algorithm identification, filled from the model spec."""

    name: str
    version: str
    manufacturer: str = "sijnode"
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceResult:
    """One slice's score, in the order of the slices along the slice normal."""

    sop_instance_uid: str
    series_instance_uid: str
    position_index: int
    instance_number: int | None
    score: float
    filtered_score: float | None
    positive: bool


@dataclass(frozen=True)
class Region:
    """A box on the source slice, in pixel coordinates (column, row), inclusive-exclusive.

    Used for the SR's planar ROI (closed POLYLINE around the Grad-CAM peak, TID 1410).
    """

    column0: float
    row0: float
    column1: float
    row1: float

    def polyline(self) -> list[tuple[float, float]]:
        """Closed polyline (column, row) points: first point repeated last (PS3.3 C.18.6)."""
        c0, r0, c1, r1 = self.column0, self.row0, self.column1, self.row1
        return [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM of one explained slice, mapped back onto the source slice's pixel grid."""

    sop_instance_uid: str
    series_instance_uid: str
    position_index: int
    instance_number: int | None
    score: float
    #: uint8 (Rows, Columns) of the source slice; 255 = the map's maximum.
    heatmap: npt.NDArray[np.uint8]
    #: Box around the heatmap's peak, in source pixel coordinates.
    peak_region: Region
    #: "R", "L" or None (MR: the side whose ROI holds the peak).
    laterality: str | None = None

    @classmethod
    def of_slice(
        cls,
        scored: SliceResult,
        heatmap: npt.NDArray[np.uint8],
        peak_region: Region,
        laterality: str | None,
    ) -> Explanation:
        """The explanation of the scored slice ``scored``, with its map and peak."""
        return cls(
            sop_instance_uid=scored.sop_instance_uid,
            series_instance_uid=scored.series_instance_uid,
            position_index=scored.position_index,
            instance_number=scored.instance_number,
            score=scored.score,
            heatmap=heatmap,
            peak_region=peak_region,
            laterality=laterality,
        )


@dataclass(frozen=True)
class PipelineResult:
    """The whole result of one job."""

    pipeline: str
    finding: Finding
    decision: Decision
    #: Study (CT) or subject (MR) probability in [0, 1].
    probability: float
    #: Threshold the probability (CT) or the mean filtered decision (MR) was compared with.
    threshold: float
    slice_threshold: float
    #: Name of the aggregation rule and its parameters (recorded and reported).
    aggregation: str
    aggregation_parameters: dict[str, Any]
    study_instance_uid: str
    slices: tuple[SliceResult, ...]
    explanations: tuple[Explanation, ...]
    algorithm: AlgorithmIdentity
    device: str
    precision: str
    #: Seconds per stage: decode, preprocess, localise, infer, explain.
    stage_seconds: dict[str, float]
    #: "B", "L", "R" or None where the finding site's side is known.
    laterality: str | None = None
    #: Why the decision is Indeterminate (e.g. no plausible SI joint found), else None.
    reason: str | None = None
    #: Recorded steps (localisation boxes, rejected boxes, noise seed...) for the audit.
    steps: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.decision is Decision.INDETERMINATE and not self.reason:
            raise ValueError("an Indeterminate result needs a reason")


# -- persistence: JSON for the record, an .npz beside it for the heatmaps ------------------

RESULT_JSON = "result.json"
HEATMAPS_NPZ = "heatmaps.npz"


def result_to_dict(result: PipelineResult) -> dict[str, Any]:
    """Everything but the heatmaps, JSON-ready (heatmaps are keyed by SOPInstanceUID)."""
    return {
        "pipeline": result.pipeline,
        "finding": result.finding.value,
        "decision": result.decision.value,
        "probability": result.probability,
        "threshold": result.threshold,
        "slice_threshold": result.slice_threshold,
        "aggregation": result.aggregation,
        "aggregation_parameters": result.aggregation_parameters,
        "study_instance_uid": result.study_instance_uid,
        "slices": [vars(s) for s in result.slices],
        "explanations": [
            {k: v for k, v in vars(e).items() if k != "heatmap"}
            | {"peak_region": vars(e.peak_region)}
            for e in result.explanations
        ],
        "algorithm": vars(result.algorithm),
        "device": result.device,
        "precision": result.precision,
        "stage_seconds": result.stage_seconds,
        "laterality": result.laterality,
        "reason": result.reason,
        "steps": result.steps,
    }


def result_from_dict(data: dict[str, Any], heatmaps: dict[str, np.ndarray]) -> PipelineResult:
    """The inverse of :func:`result_to_dict`, with heatmaps by SOPInstanceUID."""
    explanations = tuple(
        Explanation(
            **{k: v for k, v in e.items() if k != "peak_region"},
            peak_region=Region(**e["peak_region"]),
            heatmap=np.asarray(heatmaps[e["sop_instance_uid"]], dtype=np.uint8),
        )
        for e in data["explanations"]
    )
    return PipelineResult(
        **{
            k: v
            for k, v in data.items()
            if k not in {"finding", "decision", "slices", "explanations", "algorithm"}
        },
        finding=Finding(data["finding"]),
        decision=Decision(data["decision"]),
        slices=tuple(SliceResult(**s) for s in data["slices"]),
        explanations=explanations,
        algorithm=AlgorithmIdentity(**data["algorithm"]),
    )


def save_result(result: PipelineResult, directory: Path) -> Path:
    """Write ``result.json`` and ``heatmaps.npz`` (uint8, compressed) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    heatmaps = {e.sop_instance_uid: e.heatmap for e in result.explanations}
    np.savez_compressed(directory / HEATMAPS_NPZ, **heatmaps)  # type: ignore[arg-type]
    text = json.dumps(result_to_dict(result), sort_keys=True, allow_nan=False, indent=1)
    (directory / RESULT_JSON).write_text(text + "\n", encoding="utf-8")
    return directory


def load_result(directory: Path) -> PipelineResult:
    """Read what :func:`save_result` wrote."""
    data = json.loads((directory / RESULT_JSON).read_text(encoding="utf-8"))
    with np.load(directory / HEATMAPS_NPZ) as npz:
        heatmaps = {k: npz[k] for k in npz.files}
    return result_from_dict(data, heatmaps)
