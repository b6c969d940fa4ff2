"""Sacroiliitis lesions as 3-D shapes in the sacral frame of :mod:`sijnode.synth.phantom`.

CT (Fu et al. 2024, Methods: cases confirmed from joint-space changes, sclerosis and
erosions): subchondral sclerosis bands, erosion pits at the joint margins with a sclerotic
rim, and a widened or narrowed joint space. MR (Lee et al. 2021, §2.1 and §2.3: bone-marrow
oedema on Gd-enhanced fat-suppressed T1, seen on consecutive slices): ellipsoids of
enhancing marrow beside the joint. Each function returns masks for one sampled plane;
the masks are the truth, and the renderers draw exactly them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sijnode.synth.phantom import REGION_V, REGION_W, Anatomy, Sample, Waves
from sijnode.synth.truth import SingleSide, Tissue

F32 = np.float32

#: Depth beside the joint where lesions are looked for (mm).
BAND_MM = 18.0


def bone_of(sample: Sample, side: SingleSide, iliac: bool) -> np.ndarray:
    """Mask of the ilium of ``side`` (``iliac``) or the ``side`` half of the sacrum."""
    if iliac:
        return sample.labels == (Tissue.ILIUM_LEFT if side == "left" else Tissue.ILIUM_RIGHT)
    half = sample.left if side == "left" else ~sample.left
    return (sample.labels == Tissue.SACRUM) & half


def _depth(sample: Sample, anat: Anatomy, side: SingleSide, iliac: bool) -> np.ndarray:
    """Distance into the bone from the articular surface (mm), negative in the joint."""
    along = sample.d if iliac else -sample.d
    return along - F32(anat.gap_mm(side) / 2)


@dataclass(frozen=True)
class Pit:
    """One erosion: a ball of radius ``radius`` centred on the articular surface."""

    side: SingleSide
    iliac: bool
    v: float
    w: float
    radius: float


@dataclass(frozen=True)
class CtLesions:
    """Sclerosis depths and erosion pits on the affected sides of one subject."""

    sides: tuple[SingleSide, ...]
    sclerosis_iliac_mm: tuple[float, ...]
    sclerosis_sacral_mm: tuple[float, ...]
    patches: Waves
    pits: tuple[Pit, ...]


def _point_in_region(rng: np.random.Generator, scale: float, fill: float) -> tuple[float, float]:
    """A random (v, w) in mm inside ``fill`` of the articular region."""
    radius, angle = fill * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return (
        float(radius * np.cos(angle) * REGION_V * scale),
        float(radius * np.sin(angle) * REGION_W * scale),
    )


def random_ct_lesions(
    rng: np.random.Generator, anat: Anatomy, sides: tuple[SingleSide, ...]
) -> CtLesions:
    """Lesions for the affected ``sides``; erosions mostly on the iliac side, where they start."""
    pits: list[Pit] = []
    for side in sides:
        for _ in range(int(rng.integers(8, 20))):
            v, w = _point_in_region(rng, anat.scale, 0.9)
            pits.append(Pit(side, bool(rng.uniform() < 0.75), v, w, float(rng.uniform(1.6, 3.6))))
    return CtLesions(
        sides=sides,
        sclerosis_iliac_mm=tuple(float(rng.uniform(7.0, 14.0)) for _ in sides),
        sclerosis_sacral_mm=tuple(float(rng.uniform(3.0, 7.0)) for _ in sides),
        patches=Waves.random(rng, 4, 45.0),
        pits=tuple(pits),
    )


def ct_lesion_maps(
    sample: Sample, anat: Anatomy, lesions: CtLesions
) -> tuple[np.ndarray, np.ndarray]:
    """Sclerosis strength (0-1, densest at the subchondral plate) and eroded bone, one plane.

    A pixel counts as sclerotic in the truth where the strength is at least 0.5.
    """
    sclerosis = np.zeros(sample.labels.shape, dtype=F32)
    erosion = np.zeros(sample.labels.shape, dtype=bool)
    near = (np.abs(sample.d) < BAND_MM) & (sample.region < 0.95)
    idx = np.flatnonzero(near)
    if idx.size == 0 or not lesions.sides:
        return sclerosis, erosion
    v, w = sample.v.ravel()[idx], sample.w.ravel()[idx]
    patch = lesions.patches(v, w, np.zeros_like(v))
    patchy = np.clip((patch + F32(1.4)) / F32(0.8), 0, 1)
    strength = np.zeros(idx.size, dtype=F32)
    eroded = np.zeros(idx.size, dtype=bool)
    for n, side in enumerate(lesions.sides):
        for iliac, depth_mm in (
            (True, lesions.sclerosis_iliac_mm[n]),
            (False, lesions.sclerosis_sacral_mm[n]),
        ):
            bone = bone_of(sample, side, iliac).ravel()[idx]
            depth = _depth(sample, anat, side, iliac).ravel()[idx]
            limit = F32(depth_mm) * (F32(0.75) + F32(0.25) * np.cos(patch))
            band = np.clip((limit - depth) / (F32(0.35) * limit), 0, 1) * patchy
            hole = np.zeros(idx.size, dtype=F32)
            rim = np.zeros(idx.size, dtype=F32)
            for pit in lesions.pits:
                if pit.side != side or pit.iliac != iliac:
                    continue
                rho2 = (v - F32(pit.v)) ** 2 + (w - F32(pit.w)) ** 2
                hole = np.maximum(hole, np.sqrt(np.maximum(F32(pit.radius**2) - rho2, 0)))
                rim = np.maximum(rim, np.sqrt(np.maximum(F32((pit.radius + 1.5) ** 2) - rho2, 0)))
            pit_here = bone & (depth < hole)
            eroded |= pit_here
            around = np.clip((rim - depth) / F32(1.0), 0, 1)
            strength = np.where(
                bone & ~pit_here, np.maximum(strength, np.maximum(band, around)), strength
            )
    sclerosis.ravel()[idx] = strength
    erosion.ravel()[idx[eroded]] = True
    return sclerosis, erosion


@dataclass(frozen=True)
class Oedema:
    """One bone-marrow-oedema lesion: an ellipsoid in (depth, v, w), all in mm."""

    side: SingleSide
    iliac: bool
    depth: float
    v: float
    w: float
    semi_depth: float
    semi_v: float
    semi_w: float
    amplitude: float


def random_oedema(
    rng: np.random.Generator,
    anat: Anatomy,
    sides: tuple[SingleSide, ...],
    slice_w: np.ndarray,
    spacing_mm: float,
) -> tuple[Oedema, ...]:
    """1-3 lesions per affected side, centred on slices that cut the joint.

    Each spans about 2-9 slices; with up to 3 per side a positive subject has a few to about
    20 positive slices (PROTOCOLS.md B, Lee et al. 2021: 4 to 23 per axSpA subject).
    """
    limit = REGION_W * anat.scale * 0.8
    candidates = np.flatnonzero(np.abs(slice_w) < limit)
    if candidates.size == 0:
        candidates = np.array([int(np.argmin(np.abs(slice_w)))])
    out: list[Oedema] = []
    for side in sides:
        for _ in range(int(rng.integers(1, 4))):
            w = float(slice_w[int(rng.choice(candidates))])
            fill = 0.75 * np.sqrt(max(0.0, 1 - (w / (REGION_W * anat.scale)) ** 2))
            v = float(rng.uniform(-fill, fill) * REGION_V * anat.scale)
            iliac = bool(rng.uniform() < 0.7)
            out.append(
                Oedema(
                    side=side,
                    iliac=iliac,
                    depth=float(rng.uniform(3.0, 8.0) if iliac else rng.uniform(3.0, 6.0)),
                    v=v,
                    w=w,
                    semi_depth=float(rng.uniform(4.5, 9.0)),
                    semi_v=float(rng.uniform(6.0, 15.0)),
                    semi_w=float(rng.integers(2, 10) * spacing_mm / 2 + 0.5),
                    amplitude=float(rng.uniform(320.0, 600.0)),
                )
            )
    return tuple(out)


def oedema_map(sample: Sample, anat: Anatomy, lesions: tuple[Oedema, ...]) -> np.ndarray:
    """Added signal of the oedema on one plane (0 outside lesions); its support is the truth."""
    signal = np.zeros(sample.labels.shape, dtype=F32)
    if not lesions:
        return signal
    near = (np.abs(sample.d) < BAND_MM + 10) & (sample.region < 1.3)
    idx = np.flatnonzero(near)
    if idx.size == 0:
        return signal
    v, w = sample.v.ravel()[idx], sample.w.ravel()[idx]
    region = sample.region.ravel()[idx]
    values = np.zeros(idx.size, dtype=F32)
    for lesion in lesions:
        dz = ((w - F32(lesion.w)) / F32(lesion.semi_w)) ** 2
        if not (dz < 1).any():
            continue
        bone = bone_of(sample, lesion.side, lesion.iliac).ravel()[idx]
        depth = _depth(sample, anat, lesion.side, lesion.iliac).ravel()[idx]
        r2 = ((depth - F32(lesion.depth)) / F32(lesion.semi_depth)) ** 2
        r2 += ((v - F32(lesion.v)) / F32(lesion.semi_v)) ** 2 + dz
        inside = bone & (r2 < 1) & (region <= 0.9)
        profile = F32(lesion.amplitude) * (F32(0.55) + F32(0.45) * np.sqrt(1 - np.minimum(r2, 1)))
        values = np.where(inside, np.maximum(values, profile), values)
    signal.ravel()[idx] = values
    return signal
