"""MR training building blocks: edge slices without the iliac pair, the localiser's
joint-containment measure (against the joint pixels the phantom knows), the localiser's
augmentation (boxes follow the image), and the ResNet50 comparison network."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sijnode.errors import TrainingDataError
from sijnode.models.architectures import build, forward_features
from sijnode.models.roi import Box, roi_boxes
from sijnode.models.spec import mr_spec
from sijnode.synth import generate_dataset, write_dataset
from sijnode.synth.truth import Tissue
from sijnode.training.augment import localizer_augmentation
from sijnode.training.data import load_dataset
from sijnode.training.mr_study import prep_for
from sijnode.training.samples import joint_band, mr_slices, roi_contains_joint


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth-mr")
    write_dataset(
        root,
        generate_dataset(seed=3, n_subjects=4, positive_fraction=0.5, modality="mr", n_slices=6),
    )
    return root


def _drop_boxes(root: Path, keep: object) -> None:
    path = root / "rois.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(r for r in rows if keep(r))  # type: ignore[operator]


def test_edge_slices_without_the_pair_are_left_out(synth_root: Path, tmp_path: Path) -> None:
    """Slices beyond the joint, at the ends of a series, may carry one box or none."""
    root = tmp_path / "edges"
    shutil.copytree(synth_root, root)
    _drop_boxes(
        root,
        lambda r: (
            not (
                r["subject"] == "sub-0001"
                and (
                    r["InstanceNumber"] == "1"
                    or (r["InstanceNumber"] == "6" and r["side"] == "left")
                )
            )
        ),
    )
    studies = load_dataset(root, "MR", need_rois=True)
    first = next(s for s in studies if s.subject == "sub-0001")
    assert len(first.slices) == 6  # every slice is still part of the series
    data = mr_slices(studies, prep_for(32))
    of_first = data.position[data.study == studies.index(first)]
    assert of_first.tolist() == [1, 2, 3, 4]  # the two edge slices are left out
    assert len(data.labels) == 6 * len(studies) - 2


def test_a_slice_inside_the_series_without_the_pair_is_refused(
    synth_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "gap"
    shutil.copytree(synth_root, root)
    _drop_boxes(root, lambda r: not (r["subject"] == "sub-0002" and r["InstanceNumber"] == "3"))
    _drop_boxes(root, lambda r: r["subject"] != "sub-0003")  # a series without any pair
    with pytest.raises(TrainingDataError) as info:
        load_dataset(root, "MR", need_rois=True)
    text = str(info.value)
    assert "missing ROI box(es) for slice InstanceNumber 3" in text
    assert "only slices at the ends of the series may lack the pair" in text
    assert "no slice has both iliac boxes" in text


def test_joint_band_sits_on_the_medial_edge_and_the_annotated_roi_holds_it() -> None:
    left, right = Box(100, 50, 160, 200), Box(290, 40, 340, 210)
    assert joint_band(left, image_left=True) == Box(154, 50, 166, 200)  # x1 = 160 ± 6
    assert joint_band(right, image_left=False) == Box(285, 40, 295, 210)  # x0 = 290 ± 5
    assert roi_contains_joint((left, right), roi_boxes(left, right, (448, 448)))
    # Boxes that sit a fifth of a width too close to the sacrum lose the joint.
    moved = Box(112, 50, 172, 200), Box(290, 40, 340, 210)
    assert not roi_contains_joint((left, right), roi_boxes(*moved, (448, 448)))
    assert not roi_contains_joint((left, right), None)


def test_the_containment_measure_agrees_with_the_phantoms_joint_pixels() -> None:
    """Perturbed annotated boxes: "the ROI holds ≥ 80 % of both bands" against "≥ 90 % of
    the joint's pixels lie in the ROI boxes"; they agree on most slices and the box
    measure rarely claims a joint the pixels deny."""
    rng = np.random.default_rng(0)
    agree, generous, n = 0, 0, 0
    for study in generate_dataset(
        seed=11, n_subjects=3, positive_fraction=0.5, modality="mr", n_slices=6
    ):
        for k, sl in enumerate(study.slices):
            boxes = sorted((Box(r.x0, r.y0, r.x1, r.y1) for r in sl.rois), key=lambda b: b.x0)
            annotated = (boxes[0], boxes[1])
            joint = study.labelmap[k] == Tissue.JOINT
            if joint.sum() < 50:
                continue
            for sd in (0.0, 0.05, 0.1, 0.15, 0.2):
                for _ in range(6):
                    moved = []
                    for b in annotated:
                        e = rng.normal(0, sd, 4) * (b.width, b.height, b.width, b.height)
                        moved.append(
                            Box(*(round(v + d) for v, d in zip(b.as_list(), e, strict=True)))
                        )
                    rois = roi_boxes(moved[0], moved[1], joint.shape)
                    assert rois is not None
                    inside = np.zeros_like(joint)
                    for box in (rois.left, rois.right):
                        inside[box.y0 : box.y1, box.x0 : box.x1] = True
                    truth = (joint & inside).sum() / joint.sum() >= 0.9
                    said = roi_contains_joint(annotated, rois)
                    agree += said == truth
                    generous += said and not truth
                    n += 1
    assert n > 300
    assert agree / n >= 0.85, agree / n
    assert generous / n <= 0.1, generous / n


def test_localiser_augmentation_moves_boxes_with_the_image() -> None:
    size = 96
    image = np.full((1, size, size), -2.0, dtype=np.float32)
    target = np.array([0.10, 0.20, 0.35, 0.70, 0.60, 0.25, 0.90, 0.80], dtype=np.float32)
    # The image-left box bright, the image-right one half as bright: a flip must swap them.
    for k, level in ((0, 2.0), (1, 1.0)):
        x0, y0, x1, y1 = (target[4 * k : 4 * k + 4] * size).round().astype(int)
        image[0, y0:y1, x0:x1] = level
    flips = 0
    for seed in range(12):
        out, boxes = localizer_augmentation(image, target, np.random.default_rng(seed), -2.0)
        assert out.shape == image.shape and boxes.shape == (8,)
        assert (boxes[[0, 1, 4, 5]] < boxes[[2, 3, 6, 7]]).all()
        assert boxes[0] < boxes[4]  # still image-left first
        means = []
        for k in range(2):
            x0, y0, x1, y1 = (boxes[4 * k : 4 * k + 4] * size).round().astype(int)
            inner = out[0, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]
            means.append(float(inner.mean()))
        assert min(means) > 0.8, means  # each box still covers its bright rectangle
        flips += means[0] < means[1]
    assert 0 < flips < 12  # some draws flip (and swap), some do not
    a = localizer_augmentation(image, target, np.random.default_rng(3), -2.0)
    b = localizer_augmentation(image, target, np.random.default_rng(3), -2.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # seeded


def test_resnet50_comparison_network_has_the_hidden_head() -> None:
    spec = mr_spec(size=64, architecture="resnet50_hidden_head")
    model = build(spec).eval()
    assert model.fc[0].in_features == 2048  # type: ignore[index]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = forward_features(model, x)
        assert torch.allclose(features.logits, model(x).reshape(-1), atol=1e-5)
    assert features.hidden is not None and features.activations.shape[1] == 2048
