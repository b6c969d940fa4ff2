"""Synthetic axial pelvic CT through the sacroiliac joints (Fu et al. 2024, Methods).

512×512 int16 slices stored as HU + 1024 (RescaleIntercept -1024, slope 1), as the paper's
512×512 axial images; pixel spacing 0.70-0.80 mm so a 2-4 mm joint is a few pixels wide.
"""

from __future__ import annotations

import cv2
import numpy as np

from sijnode.errors import SynthesisError
from sijnode.synth.dicom import SeriesBuilder, SeriesPlan, series_uids
from sijnode.synth.lesions import ct_lesion_maps, random_ct_lesions
from sijnode.synth.noise import gaussian_pair, texture
from sijnode.synth.phantom import Pose, sample_anatomy
from sijnode.synth.subject import check_uid_root, make_subject, stream
from sijnode.synth.truth import (
    IS_BONE,
    Side,
    SliceTruth,
    SynthStudy,
    Tissue,
    combine_sides,
    sides_of,
)
from sijnode.uids import DEFAULT_UID_ROOT

F32 = np.float32
SIZE = 512
X_DIR, Y_DIR = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
MAX_SLICES = 300
RESCALE_INTERCEPT = -1024
#: Lesion pixels on one side of a slice that make the slice positive on that side.
MIN_LESION_PIXELS = 15

#: Hounsfield units of each tissue class (air -1000, fat about -100, muscle about 40,
#: cancellous bone 200-400, cortex 1000+ as the issue asks).
HU = np.zeros(len(Tissue), dtype=F32)
HU[Tissue.AIR] = -1000
HU[Tissue.FAT] = -100
HU[Tissue.MUSCLE] = 45
HU[Tissue.VISCERA] = 30
HU[Tissue.GAS] = -950
HU[Tissue.FLUID] = 10
HU[Tissue.JOINT] = 60
HU[Tissue.LIGAMENT] = 70
HU[Tissue.SACRUM] = 260
HU[Tissue.ILIUM_RIGHT] = 290
HU[Tissue.ILIUM_LEFT] = 290
HU[Tissue.VESSEL] = 40
HU[Tissue.FORAMEN] = -40
HU[Tissue.DISC] = 90
HU[Tissue.VERTEBRA] = 240
HU[Tissue.TABLE] = 250
#: Amplitude of the texture (trabecular in bone, faint in soft tissue).
TEXTURE_HU = np.where(IS_BONE, F32(55), F32(6)).astype(F32)
CORTEX_HU = 1250.0
SCLEROSIS_HU = 880.0


def default_thickness(n_slices: int) -> float:
    """Slice thickness that keeps the stack around the joints: 3 mm up to 32 slices."""
    for limit, thickness in ((32, 3.0), (64, 1.5), (128, 1.0)):
        if n_slices <= limit:
            return thickness
    return 0.625


def cortex(labels: np.ndarray, width_px: float) -> np.ndarray:
    """Bone pixels within ``width_px`` of a non-bone pixel (cortical shell)."""
    bone = IS_BONE[labels]
    dist = cv2.distanceTransform(bone.view(np.uint8), cv2.DIST_L2, 3)
    return bone & (dist <= width_px)


def generate_ct_study(
    seed: int,
    subject_index: int,
    positive: bool,
    side: Side | None = None,
    n_slices: int = 24,
    uid_root: str = DEFAULT_UID_ROOT,
    slice_thickness: float | None = None,
) -> SynthStudy:
    """An axial CT study of one subject; ``side`` is drawn when None and ``positive``."""
    if not 1 <= n_slices <= MAX_SLICES:
        raise SynthesisError(f"expected 1 to {MAX_SLICES} CT slices, got {n_slices}")
    if slice_thickness is not None and not 0.5 <= slice_thickness <= 10:
        raise SynthesisError(f"expected a slice thickness of 0.5-10 mm, got {slice_thickness}")
    check_uid_root(uid_root)
    subject = make_subject(seed, subject_index, positive, side)
    anat = subject.anatomy
    sides = sides_of(subject.side)
    lesions = random_ct_lesions(stream(seed, subject_index, "ct-lesions"), anat, sides)
    rng = stream(seed, subject_index, "ct")

    spacing = round(float(rng.uniform(0.70, 0.80)), 6)
    thickness = slice_thickness or default_thickness(n_slices)
    table_z = round(float(rng.uniform(-180, -140)), 1)
    pose = Pose.make(
        center=(
            float(rng.uniform(-12, 12)),
            40.0 * anat.body_scale + float(rng.uniform(-12, 12)),
            table_z,
        ),
        yaw_deg=float(rng.uniform(-5, 5)),
        roll_deg=float(rng.uniform(-3, 3)),
    )
    noise_hu = float(rng.uniform(8, 20))
    z_top = table_z + float(rng.uniform(-3, 3)) + (n_slices - 1) * thickness / 2
    origin = -spacing * (SIZE - 1) / 2
    axis = (origin + spacing * np.arange(SIZE)).astype(F32)
    gx, gy = np.meshgrid(axis, axis)
    table_top = pose.center[1] + 70.0 * anat.body_scale + 2.0
    table_y = gy - F32(table_top) + F32(0.0004) * gx * gx
    table = ((table_y > 0) & (table_y < 3)) | ((table_y > 12) & (table_y < 15))
    table &= np.abs(gx) < 220

    plan = SeriesPlan(
        modality="CT",
        uid_root=uid_root,
        rows=SIZE,
        columns=SIZE,
        pixel_spacing=spacing,
        slice_thickness=thickness,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        n_slices=n_slices,
        study_time="090000",
        study_description="CT PELVIS SACROILIAC JOINTS (SYNTHETIC)",
        series_description="Axial SIJ bone 3mm" if thickness == 3.0 else "Axial SIJ bone",
        body_part="PELVIS",
        series_number=2,
        window_center=(400.0, 40.0),
        window_width=(1800.0, 400.0),
        window_explanation=("BONE", "SOFT TISSUE"),
        pixel_signed=True,
        bits_stored=16,
        attributes=(
            ("KVP", "120"),
            ("DataCollectionDiameter", "500"),
            ("ReconstructionDiameter", f"{spacing * SIZE:.3f}"),
            ("GantryDetectorTilt", "0"),
            ("TableHeight", "150"),
            ("RotationDirection", "CW"),
            ("XRayTubeCurrent", 200),
            ("ExposureTime", 500),
            ("ConvolutionKernel", "BONE"),
            ("RescaleIntercept", str(RESCALE_INTERCEPT)),
            ("RescaleSlope", "1"),
            ("RescaleType", "HU"),
        ),
    )
    builder = SeriesBuilder(subject.patient, plan, series_uids(uid_root, seed, subject_index, "CT"))

    datasets, truths = [], []
    labelmap = np.empty((n_slices, SIZE, SIZE), dtype=np.uint8)
    lesion_map = np.empty((n_slices, SIZE, SIZE), dtype=bool)
    for k in range(n_slices):
        z = z_top - k * thickness
        start = np.array([0.0, 0.0, z])
        sample = sample_anatomy(anat, pose.plane(start, X_DIR, Y_DIR, axis, axis))
        labels = sample.labels
        labels[table & (labels == Tissue.AIR)] = Tissue.TABLE
        shell = cortex(labels, 1.6 / spacing)
        strength, erosion = ct_lesion_maps(sample, anat, lesions)
        labels[erosion] = Tissue.JOINT
        shell &= ~erosion

        grain = texture(rng, labels.shape, 2.5)
        hu = HU[labels] + grain * TEXTURE_HU[labels]
        hu[shell] = F32(CORTEX_HU) + F32(60) * grain[shell]
        dense = F32(SCLEROSIS_HU) + F32(70) * grain
        hu += strength * np.maximum(dense - hu, 0)
        hu = cv2.GaussianBlur(hu, (0, 0), 0.7)
        if k % 2 == 0:
            noise_pair = gaussian_pair(rng, hu.shape)
        hu += noise_pair[k % 2] * F32(noise_hu)
        stored = np.clip(np.rint(hu) - RESCALE_INTERCEPT, -1024, 3071 + 1024).astype(np.int16)

        lesion = (strength >= 0.5) | erosion
        right = int(np.count_nonzero(lesion & ~sample.left)) >= MIN_LESION_PIXELS
        left = int(np.count_nonzero(lesion & sample.left)) >= MIN_LESION_PIXELS
        ds = builder.slice(k + 1, (origin, origin, z), stored)
        datasets.append(ds)
        truths.append(
            SliceTruth(
                k + 1, str(ds.SOPInstanceUID), int(right or left), combine_sides(right, left)
            )
        )
        labelmap[k] = labels
        lesion_map[k] = lesion

    return SynthStudy(
        subject_id=subject.patient.subject_id,
        subject_index=subject_index,
        seed=seed,
        modality="CT",
        positive=subject.positive,
        side=subject.side,
        datasets=datasets,
        slices=truths,
        labelmap=labelmap,
        lesion=lesion_map,
    )
