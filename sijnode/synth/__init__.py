"""Synthetic sacroiliac-joint CT and MR studies with known truth, deterministic by seed.

Modules, in the order a study is made:

- ``subject``: random streams, synthetic identity and subject-level truth;
- ``phantom``: pelvic anatomy as implicit 3-D shapes, sampled on any plane;
- ``lesions``: erosions and sclerosis (CT), bone-marrow oedema (MR);
- ``ct`` / ``mr``: render the slices and their per-slice truth;
- ``dicom``: plain pydicom datasets (CT Image and MR Image IODs);
- ``dataset``: folders, ``labels.csv`` and ``rois.csv``; ``cli``: ``sijnode synth``.

The public names below are imported lazily, so ``import sijnode.synth.cli`` (and thus
``sijnode --help``) does not load numpy, OpenCV or pydicom.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sijnode.synth.ct import generate_ct_study
    from sijnode.synth.dataset import (
        DatasetManifest,
        generate_dataset,
        plan_subjects,
        write_dataset,
        write_study,
    )
    from sijnode.synth.mr import generate_mr_study
    from sijnode.synth.truth import RoiBox, Side, SliceTruth, SynthStudy, Tissue

_EXPORTS = {
    "generate_ct_study": "sijnode.synth.ct",
    "generate_mr_study": "sijnode.synth.mr",
    "DatasetManifest": "sijnode.synth.dataset",
    "generate_dataset": "sijnode.synth.dataset",
    "plan_subjects": "sijnode.synth.dataset",
    "write_dataset": "sijnode.synth.dataset",
    "write_study": "sijnode.synth.dataset",
    "RoiBox": "sijnode.synth.truth",
    "Side": "sijnode.synth.truth",
    "SliceTruth": "sijnode.synth.truth",
    "SynthStudy": "sijnode.synth.truth",
    "Tissue": "sijnode.synth.truth",
}

__all__ = [
    "DatasetManifest",
    "RoiBox",
    "Side",
    "SliceTruth",
    "SynthStudy",
    "Tissue",
    "generate_ct_study",
    "generate_dataset",
    "generate_mr_study",
    "plan_subjects",
    "write_dataset",
    "write_study",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sijnode.synth' has no attribute {name!r}")
