"""Synthetic oblique-coronal Gd-enhanced fat-suppressed T1 MR of the SI joints.

Protocol of Lee et al. 2021 §2.1: 3 T, FOV 250×250 mm, matrix 448×448, 2 mm slices with a
0.2 mm gap, TR 544 ms, TE 11 ms, flip angle 140°, bandwidth 326 Hz, DIXON fat suppression;
37 slices in the paper, 20-37 per subject here.
Fat-suppressed marrow is dark; bone-marrow oedema enhances and is bright.
"""

from __future__ import annotations

import cv2
import numpy as np

from sijnode.errors import SynthesisError
from sijnode.synth.dicom import SeriesBuilder, SeriesPlan, series_uids
from sijnode.synth.lesions import oedema_map, random_oedema
from sijnode.synth.noise import gaussian_pair, texture
from sijnode.synth.phantom import REGION_V, Pose, sacral_axes, sample_anatomy
from sijnode.synth.subject import check_uid_root, make_subject, stream
from sijnode.synth.truth import (
    IS_BONE,
    RoiBox,
    Side,
    SingleSide,
    SliceTruth,
    SynthStudy,
    Tissue,
    combine_sides,
    sides_of,
)
from sijnode.uids import DEFAULT_UID_ROOT

F32 = np.float32
SIZE = 448
FOV_MM = 250.0
THICKNESS_MM = 2.0
GAP_MM = 0.2
MIN_SLICES, MAX_SLICES = 4, 64
#: Oedema pixels on one side of a slice that make it positive (about 9 mm²).
MIN_LESION_PIXELS = 30
#: ROI boxes cover the ilium within the articular part of the joint plus this margin (mm).
ROI_MARGIN_MM = 8.0

#: Signal of each tissue on fat-suppressed post-contrast T1 (arbitrary units).
SIGNAL = np.zeros(len(Tissue), dtype=F32)
SIGNAL[Tissue.AIR] = 0
SIGNAL[Tissue.FAT] = 55
SIGNAL[Tissue.MUSCLE] = 170
SIGNAL[Tissue.VISCERA] = 240
SIGNAL[Tissue.GAS] = 5
SIGNAL[Tissue.FLUID] = 60
SIGNAL[Tissue.JOINT] = 150
SIGNAL[Tissue.LIGAMENT] = 70
SIGNAL[Tissue.SACRUM] = 100
SIGNAL[Tissue.ILIUM_RIGHT] = 95
SIGNAL[Tissue.ILIUM_LEFT] = 95
SIGNAL[Tissue.VESSEL] = 620
SIGNAL[Tissue.FORAMEN] = 330
SIGNAL[Tissue.DISC] = 120
SIGNAL[Tissue.VERTEBRA] = 105
SIGNAL[Tissue.TABLE] = 0
#: Relative texture: marrow is patchy, soft tissue nearly uniform.
TEXTURE = np.where(IS_BONE, F32(0.15), F32(0.06)).astype(F32)
CORTEX_SIGNAL = 25.0


def iliac_boxes(labels: np.ndarray, v_mm: np.ndarray, v_limit_mm: float) -> tuple[RoiBox, ...]:
    """Box of each ilium over the rows of the joint's craniocaudal extent (``|v| <= limit``).

    The rows are those where the ilium lies within ``v_limit_mm`` of the joint centre; the
    columns span every iliac pixel of that side in those rows.
    """
    boxes = []
    sides: tuple[tuple[SingleSide, Tissue], ...] = (
        ("right", Tissue.ILIUM_RIGHT),
        ("left", Tissue.ILIUM_LEFT),
    )
    for side, tissue in sides:
        ilium = labels == tissue
        rows = np.flatnonzero((ilium & (np.abs(v_mm) <= v_limit_mm)).any(axis=1))
        if rows.size:
            y0, y1 = int(rows[0]), int(rows[-1]) + 1
            cols = np.flatnonzero(ilium[y0:y1].any(axis=0))
            boxes.append(RoiBox(side, int(cols[0]), y0, int(cols[-1]) + 1, y1))
    return tuple(boxes)


def _bias(rng: np.random.Generator) -> np.ndarray:
    """Smooth receive-coil sensitivity, 0.8-1.2 across the field of view."""
    t = np.linspace(-1, 1, SIZE, dtype=F32)
    rows = 1 + F32(rng.uniform(-0.12, 0.12)) * t + F32(rng.uniform(-0.1, 0.1)) * t * t
    cols = 1 + F32(rng.uniform(-0.1, 0.1)) * t + F32(rng.uniform(0.0, 0.15)) * t * t
    return np.outer(rows, cols).astype(F32)


def generate_mr_study(
    seed: int,
    subject_index: int,
    positive: bool,
    side: Side | None = None,
    n_slices: int | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> SynthStudy:
    """An oblique-coronal MR study of one subject; 20-37 slices are drawn when None."""
    check_uid_root(uid_root)
    subject = make_subject(seed, subject_index, positive, side)
    anat = subject.anatomy
    rng = stream(seed, subject_index, "mr")
    drawn = int(rng.integers(20, 38))
    n = drawn if n_slices is None else n_slices
    if not MIN_SLICES <= n <= MAX_SLICES:
        raise SynthesisError(f"expected {MIN_SLICES} to {MAX_SLICES} MR slices, got {n}")

    spacing = THICKNESS_MM + GAP_MM
    pixel = FOV_MM / SIZE
    tilt = np.radians(anat.tilt_deg + float(rng.uniform(-3, 3)))
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.sin(tilt), -np.cos(tilt)])
    normal = np.cross(row_dir, col_dir)
    pose = Pose.make(
        center=(
            float(rng.uniform(-10, 10)),
            float(rng.uniform(-10, 10)),
            float(rng.uniform(-20, 20)),
        ),
        yaw_deg=float(rng.uniform(-4, 4)),
        roll_deg=float(rng.uniform(-3, 3)),
    )
    fov_center = pose.center + rng.uniform(-8, 8) * row_dir + rng.uniform(-8, 8) * col_dir
    offset = float(rng.uniform(-1, 1))
    centers = [fov_center + (k - (n - 1) / 2 + offset) * spacing * normal for k in range(n)]
    _, w_axis = sacral_axes(anat.tilt_deg)
    slice_w = np.array([w_axis @ pose.rotation.T @ (c - pose.center) for c in centers])
    oedema = random_oedema(
        stream(seed, subject_index, "mr-lesions"), anat, sides_of(subject.side), slice_w, spacing
    )

    gain = float(rng.uniform(0.8, 1.3))
    noise = float(rng.uniform(8, 14))
    bias = _bias(rng) * F32(gain)
    steps = (np.arange(SIZE) - (SIZE - 1) / 2) * pixel
    first_pixel = float(steps[0])
    v_limit = (REGION_V + ROI_MARGIN_MM) * anat.scale

    plan = SeriesPlan(
        modality="MR",
        uid_root=uid_root,
        rows=SIZE,
        columns=SIZE,
        pixel_spacing=round(pixel, 6),
        slice_thickness=THICKNESS_MM,
        orientation=tuple(float(round(c, 6)) for c in (*row_dir, *col_dir)),
        n_slices=n,
        study_time="140000",
        study_description="MR SACROILIAC JOINTS (SYNTHETIC)",
        series_description="t1_tse_fs_cor_obl_post",
        body_part="PELVIS",
        series_number=5,
        window_center=(round(350 * gain),),
        window_width=(round(800 * gain),),
        window_explanation=("T1 FS",),
        pixel_signed=False,
        bits_stored=12,
        attributes=(
            ("ScanningSequence", "SE"),
            ("SequenceVariant", ["SK", "SP"]),
            ("ScanOptions", "FS"),
            ("MRAcquisitionType", "2D"),
            ("SequenceName", "*tse2d1_3"),
            ("AngioFlag", "N"),
            ("RepetitionTime", "544"),
            ("EchoTime", "11"),
            ("EchoTrainLength", 3),
            ("NumberOfAverages", "1"),
            ("ImagingFrequency", "123.2"),
            ("ImagedNucleus", "1H"),
            ("MagneticFieldStrength", "3"),
            ("SpacingBetweenSlices", f"{spacing:.1f}"),
            ("PercentSampling", "100"),
            ("PercentPhaseFieldOfView", "100"),
            ("PixelBandwidth", "326"),
            ("AcquisitionMatrix", [0, SIZE, SIZE, 0]),
            ("InPlanePhaseEncodingDirection", "ROW"),
            ("FlipAngle", "140"),
            ("ContrastBolusAgent", "Gadolinium"),
            ("ContrastBolusRoute", "IV"),
        ),
    )
    builder = SeriesBuilder(subject.patient, plan, series_uids(uid_root, seed, subject_index, "MR"))

    datasets, truths = [], []
    labelmap = np.empty((n, SIZE, SIZE), dtype=np.uint8)
    lesion_map = np.empty((n, SIZE, SIZE), dtype=bool)
    cortex_px = 1.2 / pixel
    for k, center in enumerate(centers):
        sample = sample_anatomy(anat, pose.plane(center, row_dir, col_dir, steps, steps))
        labels = sample.labels
        signal_added = oedema_map(sample, anat, oedema)
        lesion = signal_added > 0
        # A side with only a sliver of oedema is not called: drop it so pixels match labels.
        right = int(np.count_nonzero(lesion & ~sample.left)) >= MIN_LESION_PIXELS
        left = int(np.count_nonzero(lesion & sample.left)) >= MIN_LESION_PIXELS
        lesion &= np.where(sample.left, left, right)
        signal_added[~lesion] = 0

        bone = IS_BONE[labels]
        dist = cv2.distanceTransform(bone.view(np.uint8), cv2.DIST_L2, 3)
        grain = texture(rng, labels.shape, 4)
        image = SIGNAL[labels] * (1 + grain * TEXTURE[labels])
        image[bone & (dist <= cortex_px)] = CORTEX_SIGNAL
        image += signal_added * (1 + F32(0.12) * grain)
        image = cv2.GaussianBlur(image, (0, 0), 0.6) * bias
        real, imag = gaussian_pair(rng, image.shape)
        real = image + real * F32(noise)
        imag *= F32(noise)
        magnitude = np.sqrt(real * real + imag * imag)
        stored = np.clip(np.rint(magnitude), 0, 4095).astype(np.uint16)

        position = center + first_pixel * row_dir + first_pixel * col_dir
        ds = builder.slice(k + 1, position.tolist(), stored)
        datasets.append(ds)
        truths.append(
            SliceTruth(
                k + 1,
                str(ds.SOPInstanceUID),
                int(right or left),
                combine_sides(right, left),
                iliac_boxes(labels, sample.v, v_limit),
            )
        )
        labelmap[k] = labels
        lesion_map[k] = lesion

    if subject.positive and not any(t.label for t in truths):
        raise SynthesisError(
            f"expected oedema on at least one slice of positive subject {subject_index}, got none"
        )
    return SynthStudy(
        subject_id=subject.patient.subject_id,
        subject_index=subject_index,
        seed=seed,
        modality="MR",
        positive=subject.positive,
        side=subject.side,
        datasets=datasets,
        slices=truths,
        labelmap=labelmap,
        lesion=lesion_map,
    )
