"""The ROI rule (Lee et al. 2021 §2.2) and the aggregation rules against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from sijnode.models.aggregate import ct_study, median_filter, mr_subject
from sijnode.models.roi import Box, RoiBoxes, patch_to_slice, roi_boxes, roi_patch


def test_roi_boxes_shift_and_height_match() -> None:
    # Left box 20 wide moves right by 16; right box 30 wide moves left by 24 and grows
    # from 20 to 40 rows about its centre.
    rois = roi_boxes(Box(10, 20, 30, 60), Box(150, 30, 180, 50), (100, 200), 0.8)
    assert rois == RoiBoxes(Box(26, 20, 46, 60), Box(126, 20, 156, 60))
    assert rois.joined_shape == (40, 50)


def test_roi_boxes_at_the_image_edge() -> None:
    # The right box sits on the bottom edge: grown to 30 rows it is moved back inside.
    rois = roi_boxes(Box(0, 0, 10, 30), Box(190, 85, 200, 100), (100, 200), 0.8)
    assert rois == RoiBoxes(Box(8, 0, 18, 30), Box(182, 70, 192, 100))
    # A box pushed over the right edge by the shift is clipped to the image.
    rois = roi_boxes(Box(30, 0, 45, 10), Box(45, 5, 50, 10), (20, 50), 0.8)
    assert rois == RoiBoxes(Box(42, 0, 50, 10), Box(41, 3, 46, 13))
    # A box wholly outside the image gives no ROI.
    assert roi_boxes(Box(60, 0, 70, 10), Box(20, 0, 30, 10), (20, 50), 0.8) is None


def test_roi_shift_rounds_to_whole_pixels() -> None:
    rois = roi_boxes(Box(0, 0, 7, 4), Box(40, 0, 47, 4), (10, 50), 0.8)  # 0.8 × 7 = 5.6 → 6
    assert rois is not None and rois.left.x0 == 6 and rois.right.x0 == 34


def test_roi_patch_joins_side_by_side_and_maps_back() -> None:
    image = np.arange(20 * 30, dtype=np.float32).reshape(20, 30)
    rois = RoiBoxes(Box(2, 3, 6, 11), Box(20, 5, 24, 13))  # 8 rows × (4 + 4) columns
    patch = roi_patch(image, rois, 8)  # already 8×8: the resize is the identity
    expected = np.hstack([image[3:11, 2:6], image[5:13, 20:24]])
    np.testing.assert_array_equal(patch, expected)
    back = patch_to_slice(patch, rois, image.shape)
    np.testing.assert_array_equal(back[3:11, 2:6], image[3:11, 2:6])
    np.testing.assert_array_equal(back[5:13, 20:24], image[5:13, 20:24])
    mask = np.ones_like(back, dtype=bool)
    mask[3:11, 2:6] = mask[5:13, 20:24] = False
    assert not back[mask].any()


def test_patch_to_slice_takes_the_maximum_where_boxes_overlap() -> None:
    rois = RoiBoxes(Box(0, 0, 4, 4), Box(2, 0, 6, 4))
    values = np.hstack([np.full((4, 4), 0.2), np.full((4, 4), 0.7)]).astype(np.float32)
    back = patch_to_slice(values, rois, (4, 8))
    np.testing.assert_allclose(back[0], [0.2, 0.2, 0.7, 0.7, 0.7, 0.7, 0, 0])


def test_median_filter_size_3_repeats_the_ends() -> None:
    np.testing.assert_array_equal(median_filter([0, 1, 0, 0, 1, 1, 0], 3), [0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(median_filter([1, 0], 3), [1, 0])
    np.testing.assert_array_equal(median_filter([0.3], 3), [0.3])
    with pytest.raises(ValueError, match="odd"):
        median_filter([1, 2], 2)


def test_mr_subject_hand_computed() -> None:
    p = [0.9, 0.2, 0.1, 0.7, 0.8, 0.3]
    agg = mr_subject(p, slice_threshold=0.5, subject_threshold=0.5)
    np.testing.assert_array_equal(agg.decisions, [1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(agg.filtered_decisions, [1, 0, 0, 1, 1, 0])
    np.testing.assert_allclose(agg.filtered_probabilities, [0.9, 0.2, 0.2, 0.7, 0.7, 0.3])
    assert agg.result == pytest.approx(0.5) and agg.positive
    assert agg.probability == pytest.approx(0.5)
    assert not mr_subject(p, 0.5, 0.6).positive
    # A lone positive slice is removed by the filter.
    lone = mr_subject([0.1, 0.9, 0.1, 0.1], 0.5, 0.25)
    np.testing.assert_array_equal(lone.filtered_decisions, [0, 0, 0, 0])
    assert lone.result == 0.0 and not lone.positive


def test_ct_study_hand_computed() -> None:
    agg = ct_study([0.1, 0.9, 0.2, 0.8, 0.85, 0.7, 0.1], study_threshold=0.75, top_k=3)
    np.testing.assert_allclose(agg.filtered, [0.1, 0.2, 0.8, 0.8, 0.8, 0.7, 0.1])
    assert agg.score == pytest.approx(0.8) and agg.positive
    assert agg.top_indices == (2, 3, 4)
    short = ct_study([0.4, 0.6], study_threshold=0.5, top_k=3)  # k > n: all slices
    assert short.score == pytest.approx(0.5) and short.positive
    # A lone high slice does not decide the study.
    assert not ct_study([0.1, 0.1, 0.95, 0.1, 0.1], 0.5, top_k=1).positive
