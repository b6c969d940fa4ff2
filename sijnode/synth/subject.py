"""One synthetic subject: random streams, identity, anatomy and truth shared by its studies."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sijnode.errors import SynthesisError
from sijnode.synth.dicom import Patient, make_patient
from sijnode.synth.phantom import Anatomy, random_anatomy
from sijnode.synth.truth import Side, check_side, sides_of
from sijnode.uids import UID_PATTERN

#: Independent random streams per subject, so changing one modality leaves the other intact.
STREAMS = {
    "plan": 0,
    "patient": 1,
    "anatomy": 2,
    "side": 3,
    "joint": 4,
    "ct": 5,
    "ct-lesions": 6,
    "mr": 7,
    "mr-lesions": 8,
}


def stream(seed: int, subject_index: int, name: str) -> np.random.Generator:
    """The random stream ``name`` of one subject (PCG64: the same numbers on every platform)."""
    return np.random.default_rng(np.random.SeedSequence([seed, subject_index, STREAMS[name]]))


def check_uid_root(uid_root: str) -> str:
    """Return ``uid_root`` if it is a UID prefix ending with a dot, at most 54 characters."""
    if not uid_root.endswith(".") or len(uid_root) > 54 or not UID_PATTERN.match(uid_root[:-1]):
        raise SynthesisError(
            f"expected a UID root that ends with '.' and is at most 54 characters, got {uid_root!r}"
        )
    return uid_root


def check_counts(seed: int, subject_index: int) -> None:
    """Seeds are non-negative integers and subjects are numbered from 1."""
    if seed < 0:
        raise SynthesisError(f"expected a seed >= 0, got {seed}")
    if not 1 <= subject_index <= 9999:
        raise SynthesisError(f"expected a subject index from 1 to 9999, got {subject_index}")


@dataclass(frozen=True)
class Subject:
    """A synthetic patient with anatomy and subject-level truth."""

    seed: int
    index: int
    patient: Patient
    anatomy: Anatomy
    positive: bool
    side: Side


def random_side(seed: int, subject_index: int) -> Side:
    """Bilateral in 40 %, left or right in 30 % each (sacroiliitis is often bilateral)."""
    value = str(
        stream(seed, subject_index, "side").choice(["both", "left", "right"], p=[0.4, 0.3, 0.3])
    )
    return check_side(True, value)


def make_subject(seed: int, subject_index: int, positive: bool, side: Side | None) -> Subject:
    """The subject ``subject_index`` of ``seed``; ``side`` is drawn when None and positive.

    Affected joints get a joint-space change in 60 % of sides: widened to 4.2-6 mm
    (pseudo-widening from erosions) or narrowed to 1-1.6 mm (Fu et al. 2024, Methods, list
    joint-space changes among the criteria).
    """
    check_counts(seed, subject_index)
    if side is None:
        side = random_side(seed, subject_index) if positive else "none"
    side = check_side(positive, side)
    anatomy = random_anatomy(stream(seed, subject_index, "anatomy"))
    rng = stream(seed, subject_index, "joint")
    for one in sides_of(side):
        change = rng.uniform()
        gap = rng.uniform(4.2, 6.0) if change < 0.4 else rng.uniform(1.0, 1.6)
        if change < 0.6 and one == "left":
            anatomy = replace(anatomy, gap_left_mm=float(gap))
        elif change < 0.6:
            anatomy = replace(anatomy, gap_right_mm=float(gap))
    patient = make_patient(seed, subject_index, stream(seed, subject_index, "patient"))
    return Subject(seed, subject_index, patient, anatomy, positive, side)
