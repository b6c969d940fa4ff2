"""Pelvic anatomy around the sacroiliac joints as implicit 3-D shapes, sampled on any plane.

One subject has one anatomy (shared by its CT and MR studies); a modality samples it on
its own planes (axial for CT, oblique coronal for MR), so lesions that are 3-D shapes
span consecutive slices by construction. Lengths are in millimetres. The anatomy lives
in a *sacral frame*: ``u`` to the patient's left, ``v`` up the long axis of the sacrum,
``w`` anterior and perpendicular to it; the origin is the centre of the articular
(synovial) part of the joints. ``d`` is the signed distance from the joint midline,
negative on the sacral side and positive on the iliac side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sijnode.synth.truth import Tissue

F32 = np.float32

#: Articular part of the joint, an ellipse in (v, w) of these canonical semi-axes (mm).
#: Adult SI joints are about 7-9 cm long and 2-4 cm deep (anatomy texts; neither paper).
REGION_V = 42.0
REGION_W = 16.0


@dataclass(frozen=True)
class Waves:
    """A smooth random 3-D field: a sum of a few cosines (cheap, vectorised, seedable)."""

    k: np.ndarray
    phase: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, wavelength_mm: float) -> Waves:
        """``n`` cosines of random direction with wavelengths near ``wavelength_mm``."""
        direction = rng.normal(size=(n, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        lengths = wavelength_mm * rng.uniform(0.7, 1.4, size=(n, 1))
        k = (2 * np.pi * direction / lengths).astype(F32)
        return cls(k=k, phase=rng.uniform(0, 2 * np.pi, size=n).astype(F32))

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The field at the given points, about unit variance."""
        out = np.zeros(np.shape(x), dtype=F32)
        for (kx, ky, kz), ph in zip(self.k, self.phase, strict=True):
            out += np.cos(kx * x + ky * y + kz * z + ph)
        return out * F32(np.sqrt(2.0 / len(self.phase)))


@dataclass(frozen=True)
class Anatomy:
    """Per-subject anatomy: size, sacral tilt, joint widths and texture fields."""

    scale: float
    body_scale: float
    fat_mm: float
    tilt_deg: float
    gap_right_mm: float
    gap_left_mm: float
    undulation_mm: float
    undulation_phase: float
    cavity: Waves
    detail: Waves

    def gap_mm(self, side: str) -> float:
        """Width of the joint space on ``side`` (left or right), in mm."""
        return self.gap_left_mm if side == "left" else self.gap_right_mm


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult pelvis; normal joint spaces of 2-3.5 mm (issue: about 2-4 mm)."""
    scale = float(rng.uniform(0.9, 1.1))
    return Anatomy(
        scale=scale,
        body_scale=scale * float(rng.uniform(0.92, 1.08)),
        fat_mm=float(rng.uniform(8.0, 28.0)),
        tilt_deg=float(rng.uniform(24.0, 36.0)),
        gap_right_mm=float(rng.uniform(2.0, 3.5)),
        gap_left_mm=float(rng.uniform(2.0, 3.5)),
        undulation_mm=float(rng.uniform(0.5, 2.0)),
        undulation_phase=float(rng.uniform(0, 2 * np.pi)),
        cavity=Waves.random(rng, 6, 60.0),
        detail=Waves.random(rng, 5, 25.0),
    )


@dataclass(frozen=True)
class Pose:
    """Where the joint centre lies in scanner coordinates and how the subject is rotated."""

    center: np.ndarray
    rotation: np.ndarray

    @classmethod
    def make(cls, center: tuple[float, float, float], yaw_deg: float, roll_deg: float) -> Pose:
        """Rotation about the scanner z axis (yaw) then about its y axis (roll)."""
        a, b = np.radians(yaw_deg), np.radians(roll_deg)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        return cls(center=np.asarray(center, dtype=float), rotation=ry @ rz)

    def plane(
        self,
        origin: np.ndarray,
        row_dir: np.ndarray,
        col_dir: np.ndarray,
        col_steps: np.ndarray,
        row_steps: np.ndarray,
    ) -> np.ndarray:
        """Anatomical points (3, rows, columns) of the scanner plane through ``origin``.

        Pixel (r, c) lies at ``origin + col_steps[c] * row_dir + row_steps[r] * col_dir``
        (PS3.3 C.7.6.2.1.1: the row direction runs along a row, across the columns).
        """
        rt = self.rotation.T
        start, along_row, along_col = (rt @ (origin - self.center)), rt @ row_dir, rt @ col_dir
        out = np.empty((3, row_steps.size, col_steps.size), dtype=F32)
        for i in range(3):
            np.add.outer(
                row_steps.astype(F32) * F32(along_col[i]) + F32(start[i]),
                col_steps.astype(F32) * F32(along_row[i]),
                out=out[i],
            )
        return out


def sacral_axes(tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``v`` (up the sacrum) and ``w`` (anterior) in the subject's LPS frame.

    The sacrum leans forward: going up its long axis moves anteriorly by ``tilt``.
    """
    t = np.radians(tilt_deg)
    return np.array([0.0, -np.sin(t), np.cos(t)]), np.array([0.0, -np.cos(t), -np.sin(t)])


@dataclass
class Sample:
    """The anatomy sampled on one plane: tissue classes and joint coordinates per pixel."""

    labels: np.ndarray
    d: np.ndarray
    v: np.ndarray
    w: np.ndarray
    left: np.ndarray
    region: np.ndarray


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inside a body outline: elliptic in front, flatter behind (a supine patient on a table)."""
    ax, ay = np.abs(x * F32(1 / a)), np.abs(y * F32(1 / b))
    ax2, ay2 = ax * ax, ay * ay
    back = ax2 * ax + ay2 * ay < 1
    front = ax2 + ay2 < 1
    return np.where(y > 0, back, front)


def _idx(mask: np.ndarray) -> np.ndarray:
    """Flat indices of the true pixels of ``mask``."""
    return np.flatnonzero(mask.reshape(-1))


def sample_anatomy(anat: Anatomy, points: np.ndarray) -> Sample:
    """Sample ``anat`` at anatomical points of shape (3, rows, columns).

    Fine structures are evaluated only on candidate pixels (flat index subsets), which
    keeps a 448×448 plane at a few milliseconds.
    """
    x, y, z = points[0], points[1], points[2]
    s, inv_s = F32(anat.scale), F32(1 / anat.scale)
    t = np.radians(anat.tilt_deg)
    st, ct = F32(np.sin(t)), F32(np.cos(t))
    u = x * inv_s
    v = (z * ct - y * st) * inv_s
    w = (y * -ct - z * st) * inv_s
    au = np.abs(u)
    left = u > 0
    labels = np.zeros(u.shape, dtype=np.uint8)
    flat = labels.reshape(-1)

    # The joint midline |u| = J(v, w): the sacrum is wedged, wider in front and at the top.
    vr, wr = v * F32(1 / REGION_V), w * F32(1 / REGION_W)
    region = np.sqrt(vr * vr + wr * wr)
    joint = F32(40) + F32(0.42) * w + F32(0.05) * v
    joint += F32(anat.undulation_mm) * np.sin(v * F32(1 / 15) + F32(anat.undulation_phase))
    d = (au - joint) * s

    # Body outline, subcutaneous fat, muscle, pelvic cavity (anatomical axial frame).
    bs = F32(anat.body_scale)
    yb = y + F32(40.0) * bs
    a, b = 140.0 * float(bs), 110.0 * float(bs)
    body = _superellipse(x, yb, a, b)
    inner = _superellipse(x, yb, a - anat.fat_mm, b - anat.fat_mm)
    labels[body] = Tissue.FAT
    labels[inner] = Tissue.MUSCLE
    cx, cy = x * F32(1 / (82 * bs)), (y + F32(62) * bs) * F32(1 / (72 * bs))
    cavity = _idx(inner & (cx * cx + cy * cy < 1))
    if cavity.size:
        xc, yc, zc = x.reshape(-1)[cavity], y.reshape(-1)[cavity], z.reshape(-1)[cavity]
        field = anat.cavity(xc, yc, zc)
        fine = anat.detail(xc, yc, zc)
        tissue = np.where(field > -0.2, Tissue.VISCERA, Tissue.FAT).astype(np.uint8)
        tissue[(field > 0.2) & (fine > 1.2)] = Tissue.GAS
        flat[cavity] = tissue
    muscle = _idx(labels == Tissue.MUSCLE)
    if muscle.size:
        xm, ym, zm = x.reshape(-1)[muscle], y.reshape(-1)[muscle], z.reshape(-1)[muscle]
        flat[muscle[np.abs(anat.detail(xm, ym * F32(1.7), zm)) < 0.08]] = Tissue.FAT

    # Internal iliac vessels run down the front of the sacrum, two per side.
    near = _idx(inner & (w > 20) & (w < 34))
    if near.size:
        vu, vw = au.reshape(-1)[near] - F32(0.12) * v.reshape(-1)[near], w.reshape(-1)[near] - 27
        for offset, radius in ((30.0, 4.0), (40.0, 5.0)):
            flat[near[(vu - F32(offset)) ** 2 + vw * vw < radius * radius]] = Tissue.VESSEL

    gap_right = F32(anat.gap_right_mm / 2) * inv_s
    gap_step = F32(anat.gap_left_mm / 2) * inv_s - gap_right

    # Sacrum: thinner towards its apex, with canal, anterior foramina and fused disc lines.
    cand = _idx((v < 44) & (v > -80) & (au < joint) & (w > -40) & (w < 22))
    if cand.size:
        su, sv, sw, sau = (arr.reshape(-1)[cand] for arr in (u, v, w, au))
        half_gap = gap_right + gap_step * left.reshape(-1)[cand]
        taper = F32(22.0) * np.maximum(region.reshape(-1)[cand] - 1, 0)
        thick = F32(0.55) + F32(0.45) * np.clip((sv + 75) * F32(1 / 120), 0, 1)
        u2 = su * su
        w_front = (F32(20) - F32(0.0035) * u2) * thick
        crest = F32(8) * np.clip(1 - sau * F32(0.2), 0, 1) * (sv > -40)
        w_back = (F32(-22) + F32(0.004) * u2) * thick - crest
        inside = (sau < joint.reshape(-1)[cand] - half_gap - taper) & (sw < w_front) & (sw > w_back)
        cand, su, sv, sw, sau, thick = (arr[inside] for arr in (cand, su, sv, sw, sau, thick))
        tissue = np.full(cand.size, Tissue.SACRUM, dtype=np.uint8)
        canal_w = F32(-13) * thick
        cu, cw = su / (F32(10) * thick), (sw - canal_w) / (F32(5.5) * thick)
        tissue[cu * cu + cw * cw < 1] = Tissue.FLUID
        for level, lateral, radius in ((24.0, 19.0, 5.0), (2.0, 17.0, 4.5), (-20.0, 15.0, 4.0)):
            hole = (sau - F32(lateral)) ** 2 + (sv - F32(level)) ** 2 < radius * radius
            tissue[hole & (sw > canal_w)] = Tissue.FORAMEN
        for level in (13.0, -9.0, -30.0):
            tissue[(np.abs(sv - F32(level)) < 1.2) & (sau < F32(15) * thick)] = Tissue.DISC
        flat[cand] = tissue

    # L5 body above the sacral base, with the L5-S1 disc.
    cand = _idx((v >= 44) & (v < 84) & (au < 24))
    if cand.size:
        lu, lw = u.reshape(-1)[cand] * F32(1 / 24), (w.reshape(-1)[cand] - 5) * F32(1 / 14)
        cand = cand[lu * lu + lw * lw < 1]
        flat[cand] = np.where(v.reshape(-1)[cand] < 53, Tissue.DISC, Tissue.VERTEBRA)

    # Ilia: a thick posterior body beside the joint, and the thin wing flaring antero-laterally.
    def medial_edge(cand: np.ndarray) -> np.ndarray:
        """|u| of the ilium's articular surface; behind the joint the posterior iliac
        tuberosity keeps its distance from the midline."""
        iw, iv = w.reshape(-1)[cand], v.reshape(-1)[cand]
        front = np.maximum(iw, 0) * F32(1 / REGION_W)
        vr_i = iv * F32(1 / REGION_V)
        taper_ilium = F32(22.0) * np.maximum(np.sqrt(vr_i * vr_i + front * front) - 1, 0)
        taper_ilium += F32(0.42) * np.maximum(-REGION_W - iw, 0)
        half_gap = gap_right + gap_step * left.reshape(-1)[cand]
        return joint.reshape(-1)[cand] + half_gap + taper_ilium

    ilium = np.zeros(labels.size, dtype=bool)
    cand = _idx((au > joint) & (w > -42) & (w < 24) & (v > -120) & (v < 64) & inner)
    if cand.size:
        thickness = np.clip(F32(24) - F32(0.3) * w.reshape(-1)[cand], 14, 34)
        offset = au.reshape(-1)[cand] - medial_edge(cand)
        ilium[cand[(offset > 0) & (offset < thickness)]] = True
    cand = _idx((v > -20) & (v < 68) & (au > 56) & inner)
    if cand.size:
        wv = v.reshape(-1)[cand]
        phi = np.radians(F32(55) - F32(0.25) * wv)
        cos_phi, sin_phi = np.cos(phi), np.sin(phi)
        cu, cw = au.reshape(-1)[cand] - F32(56), w.reshape(-1)[cand] - F32(10)
        along = cu * cos_phi + cw * sin_phi
        across = cw * cos_phi - cu * sin_phi
        length = F32(75) + F32(0.4) * wv
        bend = np.abs(across - F32(0.004) * along * along)
        ilium[cand[(along > 0) & (along < length) & (bend < 4 + 2 * (1 - along / length))]] = True
    cand = np.flatnonzero(ilium)
    flat[cand] = np.where(left.reshape(-1)[cand], Tissue.ILIUM_LEFT, Tissue.ILIUM_RIGHT)

    # Between sacrum and ilium: synovial joint space inside the articular region,
    # interosseous ligaments behind it.
    cand = _idx((w > -30) & (w < 24) & (v > -60) & (v < 50) & (np.abs(au - joint) < 40) & inner)
    if cand.size:
        breg = region.reshape(-1)[cand]
        half_gap = gap_right + gap_step * left.reshape(-1)[cand]
        taper = F32(22.0) * np.maximum(breg - 1, 0)
        cau = au.reshape(-1)[cand]
        cand_ok = (cau >= joint.reshape(-1)[cand] - half_gap - taper) & (cau <= medial_edge(cand))
        cand, breg = cand[cand_ok], breg[cand_ok]
        flat[cand[breg <= 1]] = Tissue.JOINT
        behind = (breg > 1) & (breg < 2.2) & (w.reshape(-1)[cand] < 0)
        flat[cand[behind]] = Tissue.LIGAMENT

    return Sample(labels=labels, d=d, v=v * s, w=w * s, left=left, region=region)
