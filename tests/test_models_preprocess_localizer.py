"""Preprocessing functions, localiser plausibility rules, the MR pipeline's Indeterminate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sijnode.errors import PipelineError
from sijnode.models.localizer import check_boxes
from sijnode.models.preprocess import (
    body_region,
    ct_slice,
    fit_zca,
    intensity_range,
    letterbox,
    noise_step,
    scale_intensity,
    to_channels,
    whiten,
    window,
)
from sijnode.models.registry import PredictOptions, get_pipeline, pipeline_names
from sijnode.models.result import Decision
from sijnode.models.roi import Box
from sijnode.models.spec import CTPreprocessing, LocalizerPreprocessing, NoiseStep, Whitening
from tests.models_support import localizer_checkpoint, mr_checkpoint, mr_study


def test_window_is_linear_and_clipped() -> None:
    hu = np.array([-500.0, 400.0, 1300.0, 3000.0], dtype=np.float32)
    np.testing.assert_allclose(window(hu, 400, 1800), [0.0, 0.5, 1.0, 1.0])


def test_letterbox_keeps_aspect_and_inverts() -> None:
    image = np.ones((100, 200), dtype=np.float32)
    out, placement = letterbox(image, (64, 64), pad_value=0.0)
    assert out.shape == (64, 64) and placement.size == (32, 64) and placement.offset == (16, 0)
    assert out[:16].max() == 0 and np.allclose(out[16:48], 1.0)
    back = placement.to_source(out)
    assert back.shape == (100, 200) and np.allclose(back, 1.0)
    assert placement.point_to_source(16, 32) == (0.0, 100.0)


def test_letterbox_of_a_region_maps_back_into_that_region() -> None:
    image = np.zeros((100, 200), dtype=np.float32)
    image[20:60, 50:130] = 1.0
    out, placement = letterbox(image, (64, 64), region=(20, 50, 40, 80))
    assert placement.size == (32, 64) and placement.offset == (16, 0)
    assert np.allclose(out[16:48], 1.0) and out[:16].max() == 0
    back = placement.to_source(out)
    assert back.shape == (100, 200)
    assert np.allclose(back[20:60, 50:130], 1.0) and back.sum() == pytest.approx(40 * 80)
    assert placement.point_to_source(16, 0) == (20.0, 50.0)
    assert placement.point_to_source(48, 64) == (60.0, 130.0)


def _body_and_table() -> np.ndarray:
    """Air, an elliptical body at 40 HU with bone inside, and a 4-pixel table line below."""
    hu = np.full((200, 240), -1000.0, dtype=np.float32)
    rows, columns = np.mgrid[:200, :240]
    body = ((rows - 90) / 60.0) ** 2 + ((columns - 110) / 80.0) ** 2 <= 1.0
    hu[body] = 40.0
    hu[(np.abs(rows - 110) < 10) & (np.abs(columns - 110) < 30)] = 700.0
    hu[170:174, 5:235] = 250.0  # the table: as dense as bone, thin, wider than the body
    return hu


def test_body_region_is_the_body_without_the_table() -> None:
    hu = _body_and_table()
    top, left, rows, columns = body_region(hu, -400.0)
    assert abs(top - 30) <= 1 and abs(rows - 121) <= 2
    assert abs(left - 30) <= 1 and abs(columns - 161) <= 2
    assert body_region(np.full((50, 50), -1000.0, dtype=np.float32), -400.0) is None


def test_body_crop_fills_the_input_with_the_body() -> None:
    hu = _body_and_table()
    whole, _ = ct_slice(hu, CTPreprocessing(clahe_clip_limit=0), (64, 64))
    cropped, placement = ct_slice(hu, CTPreprocessing(clahe_clip_limit=0, body_crop=True), (64, 64))
    assert placement.region is not None
    air = float(whole.min())
    # The body covers more of the input once the air and the table are cropped away.
    assert (cropped[0] > air).mean() > 1.5 * (whole[0] > air).mean()
    # No body at all: the whole slice, as without the crop.
    empty = np.full((40, 50), -1000.0, dtype=np.float32)
    on = CTPreprocessing(clahe_clip_limit=0, body_crop=True)
    x, p = ct_slice(empty, on, (32, 32))
    assert p.region is None
    assert np.array_equal(x, ct_slice(empty, CTPreprocessing(clahe_clip_limit=0), (32, 32))[0])


def test_identity_whitening_changes_nothing() -> None:
    n = 3
    identity = tuple(tuple(float(i == j) for j in range(n * n)) for i in range(n * n))
    image = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        whiten(image, Whitening(patch=n, mean=(0.0,) * 9, matrix=identity)), image
    )
    shifted = whiten(image, Whitening(patch=n, mean=(0.25,) * 9, matrix=identity))
    np.testing.assert_allclose(shifted, image - 0.25, atol=1e-6)


def test_fitted_zca_decorrelates_neighbours() -> None:
    rng = np.random.default_rng(1)
    smooth = [
        cv2.GaussianBlur(rng.standard_normal((96, 96)).astype(np.float32), (0, 0), 1.0)
        for _ in range(4)
    ]

    def lag1(image: np.ndarray) -> float:
        a, b = image[8:-8, 8:-9].ravel(), image[8:-8, 9:-8].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    whitening = fit_zca(smooth, patch=5, epsilon=1e-6)
    assert lag1(smooth[0]) > 0.7
    assert abs(lag1(whiten(smooth[0], whitening))) < 0.2


def test_ct_slice_shapes_and_normalisation() -> None:
    hu = np.full((40, 50), 400.0, dtype=np.float32)
    x, placement = ct_slice(hu, CTPreprocessing(clahe_clip_limit=0), (32, 32))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    r0 = placement.offset[0]
    np.testing.assert_allclose(
        x[:, r0 + 2, 5], (0.5 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225], atol=1e-5
    )


def test_noise_step_is_seeded() -> None:
    pixels = np.full((32, 32), 1000.0, dtype=np.float32)
    on = NoiseStep(enabled=True)
    a, b = noise_step(pixels, on, 7, 0), noise_step(pixels, on, 7, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, noise_step(pixels, on, 7, 1))
    assert not np.array_equal(a, noise_step(pixels, on, 8, 0))
    # Poisson part: variance (ln 1000)^4 ≈ 2275, centred.
    assert abs(float(a.mean()) - 1000.0) < 5 and 30 < float(a.std()) < 65
    assert noise_step(pixels, NoiseStep(enabled=False), 7, 0) is pixels


def test_scale_intensity_percentiles() -> None:
    pixels = np.arange(101, dtype=np.float32)
    np.testing.assert_allclose(scale_intensity(pixels, (0, 100))[[0, 50, 100]], [0, 0.5, 1])
    assert not scale_intensity(np.zeros(5, np.float32), (1, 99)).any()


@pytest.mark.parametrize("percentiles", [(0.5, 99.5), (0, 100), (2.5, 97.5), (50, 50.1)])
def test_intensity_range_equals_numpy_percentile(percentiles: tuple[float, float]) -> None:
    """The histogram count for integer slices gives np.percentile's floats exactly."""
    rng = np.random.default_rng(3)
    slices = [
        rng.integers(0, 4096, (448, 448)).astype(np.float32),  # stored MR values
        rng.integers(-1024, 3000, 1001).astype(np.float32),
        (rng.integers(0, 3, 500) * 7 + 2**20).astype(np.float32),  # large, sparse values
        rng.integers(0, 70000, 999).astype(np.float32),  # too wide: partitioned
        rng.normal(100, 30, 777).astype(np.float32),  # not integers: partitioned
        np.array([5.0], np.float32),
    ]
    for pixels in slices:
        expected = tuple(float(v) for v in np.percentile(pixels, percentiles))
        assert intensity_range(pixels, percentiles) == expected
    with_nan = np.array([1.0, np.nan, 3.0], np.float32)
    assert all(np.isnan(intensity_range(with_nan, percentiles)))


def test_to_channels_normalises_each_channel() -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = to_channels(image, 3, (1.0, 2.0, 3.0), (2.0, 4.0, 8.0))
    assert out.shape == (3, 3, 4) and out.dtype == np.float32 and out.flags.c_contiguous
    for c, (m, s) in enumerate([(1.0, 2.0), (2.0, 4.0), (3.0, 8.0)]):
        np.testing.assert_array_equal(out[c], (image - np.float32(m)) / np.float32(s))


RULES = LocalizerPreprocessing()
GOOD = (75.0, 128.0, 149.0, 314.0, 293.0, 117.0, 348.0, 304.0)


@pytest.mark.parametrize(
    ("predicted", "reason"),
    [
        (GOOD, None),
        ((75.0, 128.0, 75.2, 314.0, *GOOD[4:]), "image-left box has zero size"),
        ((*GOOD[:4], 500.0, 117.0, 600.0, 304.0), "image-right box lies outside the image"),
        ((*GOOD[4:], *GOOD[:4]), "sides swapped"),
        ((75.0, 128.0, 78.0, 314.0, *GOOD[4:]), "too small"),
        ((0.0, 0.0, 440.0, 440.0, *GOOD[4:]), "too large"),
        ((100.0, 128.0, 200.0, 314.0, 110.0, 128.0, 210.0, 314.0), "overlap"),
        ((float("nan"), *GOOD[1:]), "non-finite"),
    ],
)
def test_localizer_plausibility(predicted: tuple[float, ...], reason: str | None) -> None:
    found = check_boxes(3, predicted, (448, 448), RULES)
    if reason is None:
        assert found.boxes == (Box(75, 128, 149, 314), Box(293, 117, 348, 304))
        assert found.reason is None
    else:
        assert found.boxes is None and reason in str(found.reason)
        assert found.record()["reason"] == found.reason


def test_box_partly_outside_is_clipped() -> None:
    found = check_boxes(0, (-10.0, 128.0, 60.0, 314.0, *GOOD[4:]), (448, 448), RULES)
    assert found.boxes is not None and found.boxes[0] == Box(0, 128, 60, 314)


def test_no_plausible_joint_is_indeterminate(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    _, study = mr_study(tmp_path / "mr", n_slices=4)
    model, _ = mr_checkpoint(tmp_path)
    localizer, _ = localizer_checkpoint(tmp_path)  # random weights: degenerate boxes
    pipeline = get_pipeline("mr").load(
        {"model": model, "localizer": localizer}, "cpu", PredictOptions(batch_size=4)
    )
    result = pipeline.predict(study)
    assert result.decision is Decision.INDETERMINATE
    assert result.reason is not None and "no plausible SI joint" in result.reason
    assert result.slices == () and result.explanations == ()
    assert len(result.steps["localisation"]["rejected"]) == 4


def test_mr_without_localizer_names_it(tmp_path: Path) -> None:
    model, _ = mr_checkpoint(tmp_path)
    with pytest.raises(PipelineError, match=r"missing \[.localizer.\].*localiser"):
        get_pipeline("mr").load({"model": model}, "cpu")


def test_registry() -> None:
    assert {"ct", "mr"} <= set(pipeline_names())
    assert get_pipeline("mr").requires == ("model", "localizer")
    with pytest.raises(PipelineError, match="unknown pipeline 'pet'"):
        get_pipeline("pet")
