"""What a synthetic study is made of: its DICOM datasets and its known truth."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

from sijnode.errors import SynthesisError

Side = Literal["none", "left", "right", "both"]
"""Patient side of a finding (left is the patient's left: +x in DICOM LPS)."""

SIDES: tuple[Side, ...] = ("none", "left", "right", "both")
Modality = Literal["CT", "MR"]


class Tissue(IntEnum):
    """Classes of the truth label map (one uint8 per pixel)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    VISCERA = 3
    GAS = 4
    FLUID = 5
    JOINT = 6
    LIGAMENT = 7
    SACRUM = 8
    ILIUM_RIGHT = 9
    ILIUM_LEFT = 10
    VESSEL = 11
    FORAMEN = 12
    DISC = 13
    VERTEBRA = 14
    TABLE = 15


#: Classes bounded by cortex (fused sacral discs and the L5-S1 disc are not).
BONE_CLASSES: tuple[Tissue, ...] = (
    Tissue.SACRUM,
    Tissue.ILIUM_RIGHT,
    Tissue.ILIUM_LEFT,
    Tissue.VERTEBRA,
)
#: Lookup table: ``IS_BONE[labels]`` is the cortex-bounded bone mask.
IS_BONE = np.isin(np.arange(len(Tissue)), BONE_CLASSES)


def check_side(positive: bool, side: str) -> Side:
    """Return ``side`` as a :data:`Side`; a positive subject needs one, a negative none."""
    if side not in SIDES:
        raise SynthesisError(f"expected side in {SIDES}, got {side!r}")
    if positive == (side == "none"):
        raise SynthesisError(
            f"expected side 'none' for a negative subject and left/right/both for a positive "
            f"one, got positive={positive} with side={side!r}"
        )
    return side


SingleSide = Literal["left", "right"]
_SIDES_OF: dict[str, tuple[SingleSide, ...]] = {
    "none": (),
    "left": ("left",),
    "right": ("right",),
    "both": ("right", "left"),
}


def sides_of(side: Side) -> tuple[SingleSide, ...]:
    """The single sides that ``side`` covers (right first)."""
    return _SIDES_OF[side]


def combine_sides(right: bool, left: bool) -> Side:
    """The :data:`Side` of findings present on the right and/or the left."""
    return "both" if right and left else "right" if right else "left" if left else "none"


@dataclass(frozen=True)
class RoiBox:
    """Bounding box of one iliac bone on one slice, in pixels (Lee et al. 2021 §2.2, Fig. 3).

    Half-open: columns ``x0 <= x < x1`` and rows ``y0 <= y < y1``, so
    ``pixels[y0:y1, x0:x1]`` is the box.
    """

    side: SingleSide
    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class SliceTruth:
    """Known truth of one slice, in InstanceNumber order."""

    instance_number: int
    sop_instance_uid: str
    label: int
    side: Side
    rois: tuple[RoiBox, ...] = ()


@dataclass
class SynthStudy:
    """One synthetic single-series study: its datasets and its truth.

    ``labelmap`` holds one :class:`Tissue` per pixel and ``lesion`` marks lesion pixels
    (erosion, sclerosis or bone-marrow oedema), both of shape (slices, rows, columns).
    """

    subject_id: str
    subject_index: int
    seed: int
    modality: Modality
    positive: bool
    side: Side
    datasets: list[Dataset]
    slices: list[SliceTruth]
    labelmap: np.ndarray = field(repr=False)
    lesion: np.ndarray = field(repr=False)

    @property
    def label(self) -> int:
        """The subject-level label: 1 for sacroiliitis, 0 otherwise."""
        return int(self.positive)

    @property
    def study_instance_uid(self) -> str:
        """StudyInstanceUID shared by every dataset."""
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        """SeriesInstanceUID shared by every dataset."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def slice_labels(self) -> str:
        """Per-slice labels as a string of 0/1 in InstanceNumber order."""
        return "".join(str(s.label) for s in self.slices)
