"""Training samples made by the node's own code, so a model learns what the node feeds it.

Every series is read and ordered by :func:`sijnode.models.series.read_series` (position
along the slice normal: MR lower to upper pelvis), decoded by ``Series.decode`` and
preprocessed by :mod:`sijnode.models.preprocess` and :mod:`sijnode.models.roi`:

- CT (Fu et al. 2024): ``preprocess.ct_base`` is ``ct_slice`` up to the letterbox (window,
  CLAHE, body crop, resize), :func:`ct_finish` the rest (ZCA whitening, channels,
  normalisation); ``ct_finish(ct_base(hu)[0])`` equals ``ct_slice(hu)[0]``, and
  augmentation runs between them.
- MR (Lee et al. 2021): ``mr_roi_input`` on the annotated iliac boxes with the node's ROI
  rule and the noise step seeded as at inference (study seed, position index).
- Localiser: ``localizer_slice`` with the slice's intensity range, as ``mr.py`` calls it;
  targets are the annotated boxes in normalised input coordinates, image-left box first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from sijnode.errors import SeriesError, TrainingDataError
from sijnode.models.preprocess import (
    Letterbox,
    ct_base,
    intensity_range,
    letterbox,
    localizer_slice,
    mr_roi_input,
    noise_step,
    scale_intensity,
    to_channels,
    whiten,
)
from sijnode.models.registry import StudyInput
from sijnode.models.roi import Box, RoiBoxes, roi_boxes
from sijnode.models.series import Series, read_series
from sijnode.models.spec import CTPreprocessing, LocalizerPreprocessing, MRPreprocessing, Whitening
from sijnode.training.data import StudyRecord

Array = npt.NDArray[np.float32]


def read_study_series(study: StudyRecord) -> Series:
    """The study's series ordered as the node orders it."""
    try:
        return read_series(
            study.series_instance_uid,
            [s.path for s in study.slices],
            modality=study.modality,
        )
    except SeriesError as exc:
        raise TrainingDataError([f"{study.folder}: {exc}"]) from exc


def slice_labels_in_order(study: StudyRecord, series: Series) -> list[int]:
    """Slice labels in the series' order; the study label where no slice labels exist."""
    by_uid = {s.sop_instance_uid: s.label for s in study.slices}
    out = []
    for header in series.slices:
        label = by_uid.get(header.sop_instance_uid)
        out.append(study.label if label is None else int(label))
    return out


# -- CT -----------------------------------------------------------------------------------


def ct_finish(image: Array, prep: CTPreprocessing) -> Array:
    """The rest of ``ct_slice``: whitening, channels, normalisation -> (C, H, W).

    ``image`` is (H, W), or (H, W, C) after a colour augmentation (``RGBShift``): then each
    channel is whitened and normalised on its own.
    """
    if image.ndim == 2:
        if prep.whitening is not None:
            image = whiten(image, prep.whitening)
        return to_channels(image, prep.channels, prep.mean, prep.std)
    channels = []
    for c in range(prep.channels):
        plane = np.ascontiguousarray(image[..., min(c, image.shape[-1] - 1)], dtype=np.float32)
        if prep.whitening is not None:
            plane = whiten(plane, prep.whitening)
        channels.append((plane - np.float32(prep.mean[c])) / np.float32(prep.std[c]))
    return np.ascontiguousarray(np.stack(channels), dtype=np.float32)


def fit_whitening(
    images: Array, patch: int = 5, epsilon: float = 0.1, samples: int = 20000, seed: int = 0
) -> Whitening:
    """ZCA whitening of ``patch``×``patch`` neighbourhoods fitted on training images only.

    ``W = U diag(1 / sqrt(lambda + epsilon·mean(lambda))) U^T`` of the patch covariance
    (Fu et al. 2024 "PCA and whitening", vague; spec ``Whitening`` says how it is applied).
    The regulariser keeps the noise of near-zero components from being blown up.
    """
    rng = np.random.default_rng(seed)
    n, height, width = images.shape
    half = patch // 2
    idx = rng.integers(0, n, samples)
    rows = rng.integers(half, height - half, samples)
    cols = rng.integers(half, width - half, samples)
    offsets = np.arange(-half, half + 1)
    vectors = images[
        idx[:, None, None],
        rows[:, None, None] + offsets[None, :, None],
        cols[:, None, None] + offsets[None, None, :],
    ].reshape(samples, patch * patch)
    vectors = vectors.astype(np.float64)
    mean = vectors.mean(axis=0)
    cov = np.cov(vectors - mean, rowvar=False)
    values, vecs = np.linalg.eigh(cov)
    values = np.maximum(values, 0.0)
    reg = epsilon * float(values.mean()) + 1e-8
    matrix = vecs @ np.diag(1.0 / np.sqrt(values + reg)) @ vecs.T
    return Whitening(
        patch=patch,
        mean=tuple(float(v) for v in mean),
        matrix=tuple(tuple(float(v) for v in row) for row in matrix),
    )


@dataclass
class CTSlices:
    """Every CT slice of the studies: base images (before whitening) and truth."""

    images: Array  # (N, H, W) in [0, 1]
    labels: npt.NDArray[np.int64]  # (N,) slice labels
    study: npt.NDArray[np.int64]  # (N,) index into studies
    studies: list[StudyRecord]

    def of_subjects(self, subjects: Sequence[str]) -> npt.NDArray[np.int64]:
        wanted = set(subjects)
        keep = [i for i, s in enumerate(self.studies) if s.subject in wanted]
        return np.flatnonzero(np.isin(self.study, keep))


def ct_slices(
    studies: Sequence[StudyRecord], prep: CTPreprocessing, input_size: tuple[int, int]
) -> CTSlices:
    images: list[Array] = []
    labels: list[int] = []
    index: list[int] = []
    for k, study in enumerate(studies):
        series = read_study_series(study)
        for i, label in enumerate(slice_labels_in_order(study, series)):
            images.append(ct_base(series.decode(i), prep, input_size)[0])
            labels.append(label)
            index.append(k)
    return CTSlices(
        np.stack(images).astype(np.float32),
        np.asarray(labels, dtype=np.int64),
        np.asarray(index, dtype=np.int64),
        list(studies),
    )


# -- MR -----------------------------------------------------------------------------------


def annotated_iliac_boxes(study: StudyRecord, series: Series) -> list[tuple[Box, Box] | None]:
    """The annotated iliac boxes per slice in series order: (image-left, image-right)."""
    by_uid = {s.sop_instance_uid: s.rois for s in study.slices}
    out: list[tuple[Box, Box] | None] = []
    for header in series.slices:
        rois = by_uid.get(header.sop_instance_uid, ())
        if len(rois) != 2:
            out.append(None)
            continue
        boxes = sorted((Box(r.x0, r.y0, r.x1, r.y1) for r in rois), key=lambda b: b.centre_x)
        out.append((boxes[0], boxes[1]))
    return out


def mr_whole_input(
    pixels: Array, prep: MRPreprocessing, value_range: tuple[float, float], seed: int, index: int
) -> Array:
    """The whole-image comparison input (Lee et al. 2021 Table 2, first row): the noise step
    and intensity scaling of the whole slice, letterboxed to the patch size."""
    noisy = noise_step(pixels, prep.noise, seed, index)
    image = scale_intensity(noisy, prep.intensity_percentiles, value_range)
    image, _ = letterbox(image, (prep.patch_size, prep.patch_size), 0.0)
    return to_channels(image, prep.channels, prep.mean, prep.std)


@dataclass
class MRSlices:
    """Every annotated MR slice: ROI inputs, whole-image inputs, truth, order."""

    roi: Array  # (N, C, P, P)
    whole: Array | None  # (N, C, P, P) or None
    labels: npt.NDArray[np.int64]
    study: npt.NDArray[np.int64]
    position: npt.NDArray[np.int64]  # index along the series (lower to upper pelvis)
    studies: list[StudyRecord]

    def of_subjects(self, subjects: Sequence[str]) -> npt.NDArray[np.int64]:
        wanted = set(subjects)
        keep = [i for i, s in enumerate(self.studies) if s.subject in wanted]
        return np.flatnonzero(np.isin(self.study, keep))


def mr_slices(
    studies: Sequence[StudyRecord], prep: MRPreprocessing, whole_image: bool = False
) -> MRSlices:
    roi: list[Array] = []
    whole: list[Array] = []
    labels: list[int] = []
    index: list[int] = []
    position: list[int] = []
    problems: list[str] = []
    for k, study in enumerate(studies):
        series = read_study_series(study)
        seed = StudyInput.seed_for(study.study_instance_uid)
        shape = (series.rows, series.columns)
        slice_truth = slice_labels_in_order(study, series)
        for i, boxes in enumerate(annotated_iliac_boxes(study, series)):
            if boxes is None:
                continue
            rois = roi_boxes(*boxes, shape, prep.roi_shift)
            if rois is None:
                problems.append(
                    f"{study.folder}: slice {series.slices[i].instance_number}: the ROI leaves "
                    f"the image after the {prep.roi_shift}×width shift"
                )
                continue
            pixels = series.decode(i)
            value_range = intensity_range(pixels, prep.intensity_percentiles)
            roi.append(mr_roi_input(pixels, rois, prep, value_range, seed, i))
            if whole_image:
                whole.append(mr_whole_input(pixels, prep, value_range, seed, i))
            labels.append(slice_truth[i])
            index.append(k)
            position.append(i)
    if problems:
        raise TrainingDataError(problems)
    return MRSlices(
        np.stack(roi).astype(np.float32),
        np.stack(whole).astype(np.float32) if whole_image else None,
        np.asarray(labels, dtype=np.int64),
        np.asarray(index, dtype=np.int64),
        np.asarray(position, dtype=np.int64),
        list(studies),
    )


# -- localiser ----------------------------------------------------------------------------


def boxes_to_input(boxes: tuple[Box, Box], placement: Letterbox) -> Array:
    """Two slice-pixel boxes -> the localiser's 8 targets, normalised to the input."""
    height, width = placement.input_shape
    r0, c0 = placement.offset
    out = []
    for box in boxes:
        out += [
            (box.x0 * placement.scale + c0) / width,
            (box.y0 * placement.scale + r0) / height,
            (box.x1 * placement.scale + c0) / width,
            (box.y1 * placement.scale + r0) / height,
        ]
    return np.asarray(out, dtype=np.float32)


@dataclass
class LocalizerSlices:
    """Localiser inputs and targets, with what evaluation needs to go back to pixels."""

    inputs: Array  # (N, 1, S, S)
    targets: Array  # (N, 8)
    boxes: list[tuple[Box, Box]]
    placements: list[Letterbox]
    shapes: list[tuple[int, int]]
    study: npt.NDArray[np.int64]
    studies: list[StudyRecord]

    def of_subjects(self, subjects: Sequence[str]) -> npt.NDArray[np.int64]:
        wanted = set(subjects)
        keep = [i for i, s in enumerate(self.studies) if s.subject in wanted]
        return np.flatnonzero(np.isin(self.study, keep))


def localizer_slices(
    studies: Sequence[StudyRecord],
    prep: LocalizerPreprocessing,
    input_size: tuple[int, int],
    mr_prep: MRPreprocessing,
) -> LocalizerSlices:
    inputs: list[Array] = []
    targets: list[Array] = []
    boxes_out: list[tuple[Box, Box]] = []
    placements: list[Letterbox] = []
    shapes: list[tuple[int, int]] = []
    index: list[int] = []
    for k, study in enumerate(studies):
        series = read_study_series(study)
        for i, boxes in enumerate(annotated_iliac_boxes(study, series)):
            if boxes is None:
                continue
            pixels = series.decode(i)
            value_range = intensity_range(pixels, mr_prep.intensity_percentiles)
            x, placement = localizer_slice(pixels, prep, input_size, value_range)
            inputs.append(x)
            targets.append(boxes_to_input(boxes, placement))
            boxes_out.append(boxes)
            placements.append(placement)
            shapes.append((series.rows, series.columns))
            index.append(k)
    return LocalizerSlices(
        np.stack(inputs).astype(np.float32),
        np.stack(targets),
        boxes_out,
        placements,
        shapes,
        np.asarray(index, dtype=np.int64),
        list(studies),
    )


#: Half-width of the annotated joint band, as a share of the iliac box's width.
JOINT_BAND = 0.1
#: Share of each band the predicted ROI must hold. Chosen on synthetic studies, whose joint
#: pixels are known (3 seeds, 18 subjects, annotated boxes perturbed by 0-20 % of their
#: size, 4319 slices): "80 % of both bands" agrees with "90 % of the joint's pixels inside
#: the ROI boxes" on 91 % of slices (6 % too generous, 3 % too strict); 90 % of the bands
#: agrees on 84 %, mostly by denying joints the ROI holds.
JOINT_COVERED = 0.8


def joint_band(iliac: Box, image_left: bool, half_width: float = JOINT_BAND) -> Box:
    """The annotated joint of one side: a band of columns centred on the iliac box's medial
    edge (its edge toward the sacrum: ``x1`` for the image-left box, ``x0`` for the
    image-right one), ``half_width`` × the box width either side, over the box's rows.

    The articular surface is the ilium's border with the sacrum, so the box edge marks it;
    the paper's ROI (moved 0.8 × width toward the sacrum) keeps 0.2 × width of the ilium
    and so holds this band, with 0.1 × width to spare on the iliac side.
    """
    edge = iliac.x1 if image_left else iliac.x0
    half = half_width * iliac.width
    return Box(math.floor(edge - half), iliac.y0, math.ceil(edge + half), iliac.y1)


def covered_fraction(region: Box, by: Box) -> float:
    """Share of ``region``'s area inside ``by``."""
    if region.area == 0:
        return 0.0
    inter = Box(
        max(region.x0, by.x0), max(region.y0, by.y0), min(region.x1, by.x1), min(region.y1, by.y1)
    )
    inside = inter.area if inter.width > 0 and inter.height > 0 else 0
    return inside / region.area


def roi_contains_joint(
    annotated: tuple[Box, Box], predicted: RoiBoxes | None, fraction: float = JOINT_COVERED
) -> bool:
    """Whether the ROI boxes built from predicted iliac boxes hold at least ``fraction`` of
    both annotated joint bands (:func:`joint_band`), each in the ROI box of its side."""
    if predicted is None:
        return False
    left = joint_band(annotated[0], image_left=True)
    right = joint_band(annotated[1], image_left=False)
    return covered_fraction(left, predicted.left) >= fraction and (
        covered_fraction(right, predicted.right) >= fraction
    )
