"""Slice preprocessing: pure functions of the spec (no torch), shared with training.

CT (Fu et al. 2024, Methods): Hounsfield units (``series.decode`` applies the rescale),
window (bone by default), CLAHE contrast enhancement (OpenCV), optional crop to the body,
resize keeping the aspect ratio with padding, optional ZCA whitening (spec ``Whitening``),
channels, normalisation.
MR (Lee et al. 2021 §2.3): the seeded noise step, percentile intensity scaling; the ROI
patch itself is ``models/roi.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from sijnode.models.roi import RoiBoxes, roi_patch
from sijnode.models.spec import (
    CTPreprocessing,
    LocalizerPreprocessing,
    MRPreprocessing,
    NoiseStep,
    Whitening,
)

Image = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Letterbox:
    """How a slice was placed in the network input: ``input = pad(resize(slice[region]))``."""

    source_shape: tuple[int, int]  # (rows, columns) of the slice
    input_shape: tuple[int, int]  # (height, width) of the input
    scale: float
    offset: tuple[int, int]  # (row, column) of the resized slice's top-left in the input
    size: tuple[int, int]  # (rows, columns) of the resized slice
    #: (row, column, rows, columns) of the slice that was resized; None: the whole slice.
    region: tuple[int, int, int, int] | None = None

    def to_source(self, values: Image) -> Image:
        """Undo the pad and resize of an input-sized map: a map on the slice's grid (zero
        outside a cropped region)."""
        r0, c0 = self.offset
        h, w = self.size
        crop = np.ascontiguousarray(values[r0 : r0 + h, c0 : c0 + w])
        if self.region is None:
            rows, columns = self.source_shape
            out = cv2.resize(crop, (columns, rows), interpolation=cv2.INTER_LINEAR)
            return out.astype(np.float32, copy=False)
        top, left, rows, columns = self.region
        full = np.zeros(self.source_shape, dtype=np.float32)
        full[top : top + rows, left : left + columns] = cv2.resize(
            crop, (columns, rows), interpolation=cv2.INTER_LINEAR
        )
        return full

    def point_to_source(self, row: float, column: float) -> tuple[float, float]:
        """An input-space point (row, column) in slice pixels."""
        top, left = (0, 0) if self.region is None else self.region[:2]
        return (
            (row - self.offset[0]) / self.scale + top,
            (column - self.offset[1]) / self.scale + left,
        )


#: Opening that separates the body from the table and lines of air-gap noise (pixels).
BODY_OPENING = 15


def body_region(hu: Image, threshold_hu: float) -> tuple[int, int, int, int] | None:
    """(row, column, rows, columns) of the body: the largest connected region above
    ``threshold_hu`` after a morphological opening (which drops the thin table); None where
    nothing is left (CTPreprocessing ``body_crop``)."""
    mask = (hu > np.float32(threshold_hu)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (BODY_OPENING, BODY_OPENING))
    opened = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    count, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if count < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, columns, rows = (int(v) for v in stats[k, :4])
    return top, left, rows, columns


def window(hu: Image, center: float, width: float) -> Image:
    """Linear window to [0, 1]: ``center ± width/2`` (bone window by default)."""
    low = center - width / 2.0
    out = (hu - np.float32(low)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def clahe(image01: Image, clip_limit: float, tile_grid: tuple[int, int]) -> Image:
    """OpenCV CLAHE on the 8-bit image; ``clip_limit`` 0 returns the input."""
    if clip_limit <= 0:
        return image01
    u8 = np.round(image01 * 255.0).astype(np.uint8)
    out = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tile_grid).apply(u8)
    return out.astype(np.float32) * np.float32(1.0 / 255.0)


def letterbox(
    image: Image,
    shape: tuple[int, int],
    pad_value: float = 0.0,
    region: tuple[int, int, int, int] | None = None,
) -> tuple[Image, Letterbox]:
    """Resize ``image`` (or its ``region``) into ``shape`` keeping its aspect ratio, centred,
    padded."""
    source_shape = image.shape
    if region is not None:
        top, left, r, c = region
        image = image[top : top + r, left : left + c]
    rows, columns = image.shape
    height, width = shape
    scale = min(height / rows, width / columns)
    h = max(1, min(height, round(rows * scale)))
    w = max(1, min(width, round(columns * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (w, h), interpolation=interpolation)
    out = np.full((height, width), pad_value, dtype=np.float32)
    r0, c0 = (height - h) // 2, (width - w) // 2
    out[r0 : r0 + h, c0 : c0 + w] = resized
    placement = Letterbox(
        (int(source_shape[0]), int(source_shape[1])),
        (height, width),
        scale,
        (r0, c0),
        (h, w),
        region,
    )
    return out, placement


def whiten(image: Image, whitening: Whitening) -> Image:
    """ZCA whitening of each pixel's ``patch``×``patch`` neighbourhood (spec ``Whitening``)."""
    n = whitening.patch
    matrix = np.asarray(whitening.matrix, dtype=np.float32)
    centre = matrix[(n * n) // 2]
    mean = np.asarray(whitening.mean, dtype=np.float32)
    kernel = centre.reshape(n, n)
    out = cv2.filter2D(image, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT_101)
    return out - np.float32(centre @ mean)


def fit_zca(
    images: Iterable[Image],
    patch: int = 5,
    epsilon: float = 1e-2,
    patches_per_image: int = 2000,
    seed: int = 0,
) -> Whitening:
    """Fit the spec's ZCA whitening on preprocessed training images (before ``whiten``).

    ``W = U diag(1/sqrt(λ + epsilon)) Uᵀ`` of the covariance of random ``patch``×``patch``
    neighbourhoods; ``epsilon`` keeps flat directions from blowing up noise.
    """
    rng = np.random.default_rng(seed)
    half = patch // 2
    samples = []
    for image in images:
        rows, columns = image.shape
        r = rng.integers(half, rows - half, patches_per_image)
        c = rng.integers(half, columns - half, patches_per_image)
        offsets = np.arange(-half, half + 1)
        rr = r[:, None, None] + offsets[None, :, None]
        cc = c[:, None, None] + offsets[None, None, :]
        samples.append(image[rr, cc].reshape(patches_per_image, patch * patch))
    data = np.concatenate(samples).astype(np.float64)
    mean = data.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov(data - mean, rowvar=False))
    matrix = (vectors * (1.0 / np.sqrt(np.maximum(eigenvalues, 0.0) + epsilon))) @ vectors.T
    return Whitening(
        patch=patch,
        mean=tuple(float(v) for v in mean),
        matrix=tuple(tuple(float(v) for v in row) for row in matrix),
    )


def to_channels(
    image: Image, channels: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Image:
    """(C, H, W) float32: the image repeated over channels, each normalised.

    Subtracted into one new array and divided in place: the arithmetic of normalising a
    stacked copy, without its second temporary (a fresh, page-faulted 600 kB per 224²
    slice: issue 10).
    """
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    out = np.empty((channels, *image.shape), dtype=np.result_type(image, m))
    np.subtract(image, m, out=out)
    np.divide(out, s, out=out)
    return out.astype(np.float32, copy=False)


def ct_base(
    hu: Image, spec: CTPreprocessing, input_size: tuple[int, int]
) -> tuple[Image, Letterbox]:
    """``ct_slice`` up to the resize: window, CLAHE, body crop, letterbox; (H, W) in [0, 1]."""
    image = window(hu, spec.window_center, spec.window_width)
    image = clahe(image, spec.clahe_clip_limit, spec.clahe_tile_grid)
    region = body_region(hu, spec.body_threshold_hu) if spec.body_crop else None
    return letterbox(image, input_size, spec.pad_value, region)


def ct_slice(
    hu: Image, spec: CTPreprocessing, input_size: tuple[int, int]
) -> tuple[Image, Letterbox]:
    """A CT slice in HU -> the network input (C, H, W) and its placement."""
    image, placement = ct_base(hu, spec, input_size)
    if spec.whitening is not None:
        image = whiten(image, spec.whitening)
    return to_channels(image, spec.channels, spec.mean, spec.std), placement


#: Integer-valued slices spanning fewer values than this are counted, not partitioned.
HISTOGRAM_SPAN = 1 << 16


def _sorted_values(pixels: Image, ranks: npt.NDArray[np.intp]) -> npt.NDArray[np.float32] | None:
    """``np.sort(pixels, axis=None)[ranks]`` counted from a histogram, for float32 pixels
    holding integers that span fewer than ``HISTOGRAM_SPAN`` values (stored MR values);
    None for any other slice."""
    if pixels.dtype != np.float32 or pixels.size == 0:
        return None
    flat = pixels.ravel()
    low, high = flat.min(), flat.max()
    if not (np.isfinite(low) and np.isfinite(high)) or high - low >= HISTOGRAM_SPAN:
        return None
    shifted = flat - low
    codes = shifted.astype(np.int32)
    if not np.array_equal(codes.astype(np.float32), shifted):
        return None  # not integer-valued
    below = np.cumsum(np.bincount(codes))  # pixels at or below each value
    return (np.searchsorted(below, ranks, side="right") + low).astype(np.float32)


def intensity_range(pixels: Image, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The slice's ``percentiles`` of its pixel values (Lee et al. 2021 §2.3 scaling).

    Equal to ``np.percentile`` (linear method, the same float arithmetic); the two order
    statistics each side are counted from a histogram when the slice holds integers
    (issue 10: a partition of the whole slice cost more than its decode).
    """
    n = pixels.size
    virtual = (n - 1) * np.true_divide(percentiles, 100)
    before = np.minimum(np.floor(virtual), max(n - 1, 0)).astype(np.intp)
    after = np.minimum(before + 1, max(n - 1, 0))
    values = _sorted_values(pixels, np.concatenate((before, after)))
    if values is None:
        low, high = np.percentile(pixels, percentiles)
        return float(low), float(high)
    a, b = values[:2], values[2:]
    gamma = virtual - before
    difference = b - a  # numpy's _lerp, in the same dtypes
    out = np.where(gamma >= 0.5, b - difference * (1 - gamma), a + difference * gamma)
    return float(out[0]), float(out[1])


def scale_intensity(
    pixels: Image,
    percentiles: tuple[float, float],
    value_range: tuple[float, float] | None = None,
) -> Image:
    """Map the slice's ``percentiles`` (or a given ``value_range``) to [0, 1], clipped."""
    low, high = value_range if value_range is not None else intensity_range(pixels, percentiles)
    span = high - low
    if not math.isfinite(span) or span <= 1e-6:
        return np.zeros_like(pixels, dtype=np.float32)
    out = pixels - np.float32(low)
    out *= np.float32(1.0 / span)  # in place: one new array per slice, not two
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def noise_step(pixels: Image, noise: NoiseStep, seed: int, index: int) -> Image:
    """Lee et al. 2021 §2.3: Gaussian (variance 0.3) plus Poisson with mean (ln p)^4.

    Deterministic: the stream is seeded by (study seed, slice index), so one study gives
    one answer. Applied to the stored pixel values; the result is clipped at 0.
    """
    if not noise.enabled:
        return pixels
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, index])
    gaussian = rng.normal(0.0, math.sqrt(noise.gaussian_variance), pixels.shape)
    lam = np.log(np.maximum(pixels, 1.0)) ** noise.poisson_log_power
    poisson = rng.poisson(lam).astype(np.float64)
    if noise.poisson_centred:
        poisson -= lam
    out = pixels + gaussian + poisson
    return np.maximum(out, 0.0).astype(np.float32)


def localizer_slice(
    pixels: Image,
    spec: LocalizerPreprocessing,
    input_size: tuple[int, int],
    value_range: tuple[float, float] | None = None,
) -> tuple[Image, Letterbox]:
    """An MR slice -> the localiser input (1, H, W) and its placement."""
    image = scale_intensity(pixels, spec.intensity_percentiles, value_range)
    image, placement = letterbox(image, input_size, 0.0)
    return to_channels(image, spec.channels, spec.mean, spec.std), placement


def mr_roi_input(
    pixels: Image,
    rois: RoiBoxes,
    spec: MRPreprocessing,
    value_range: tuple[float, float],
    seed: int,
    index: int,
) -> Image:
    """An MR slice and its ROI boxes -> the classifier input (C, patch, patch).

    Lee et al. 2021 §2.2-2.3 on the two boxes' union only, the pixels the classifier sees:
    the noise step (when enabled) is drawn for them, intensity scaling uses the clean
    slice's percentiles (``value_range``), so the localiser and the classifier scale alike.
    """
    u = rois.union
    region = noise_step(pixels[u.y0 : u.y1, u.x0 : u.x1], spec.noise, seed, index)
    region = scale_intensity(region, spec.intensity_percentiles, value_range)
    patch = roi_patch(region, rois.moved(-u.x0, -u.y0), spec.patch_size)
    return to_channels(patch, spec.channels, spec.mean, spec.std)
