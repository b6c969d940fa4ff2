"""Automatic SI-joint localisation for MR (the MR paper's future work, PROTOCOLS.md C).

A small CNN (``architectures.LocalizerCNN``) regresses, per slice, the iliac-bone box on
the image's left half and the one on its right half, as 8 coordinates normalised to the
letterboxed input. Each predicted pair is checked before the ROI rule uses it; a pair is
rejected, with its reason recorded, when a box is not finite, has zero size, lies mostly
outside the image, is too small or too large, when the sides are swapped, or when the two
boxes overlap. Why regression and these rules: docs/models.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from sijnode.models.preprocess import Letterbox, localizer_slice
from sijnode.models.roi import Box
from sijnode.models.runtime import Runner
from sijnode.models.spec import LocalizerPreprocessing

#: Share of a predicted box that must lie inside the image.
MIN_INSIDE_FRACTION = 0.5


@dataclass(frozen=True)
class SliceBoxes:
    """The localiser's answer for one slice: two plausible boxes, or why there are none."""

    position_index: int
    #: (image-left box, image-right box) in slice pixels, or None if rejected.
    boxes: tuple[Box, Box] | None
    #: Predicted boxes in slice pixels (x0, y0, x1, y1) ×2, as floats, for the record.
    predicted: tuple[float, ...]
    reason: str | None = None

    def record(self) -> dict[str, object]:
        out: dict[str, object] = {
            "position_index": self.position_index,
            "predicted": [round(float(v), 2) for v in self.predicted],
        }
        if self.boxes is not None:
            out["boxes"] = [self.boxes[0].as_list(), self.boxes[1].as_list()]
        if self.reason:
            out["reason"] = self.reason
        return out


def _floor(value: float) -> int:
    return math.floor(value + 1e-3)


def _ceil(value: float) -> int:
    return math.ceil(value - 1e-3)


def _to_source(values: npt.NDArray[np.float32], placement: Letterbox) -> tuple[float, ...]:
    height, width = placement.input_shape
    out: list[float] = []
    for x0, y0, x1, y1 in values.reshape(2, 4).astype(np.float64):
        r0, c0 = placement.point_to_source(y0 * height, x0 * width)
        r1, c1 = placement.point_to_source(y1 * height, x1 * width)
        out += [float(c0), float(r0), float(c1), float(r1)]
    return tuple(out)


def check_boxes(
    index: int,
    predicted: tuple[float, ...],
    shape: tuple[int, int],
    rules: LocalizerPreprocessing,
) -> SliceBoxes:
    """Turn a predicted pair into plausible pixel boxes, or record why it is rejected."""
    rows, columns = shape

    def reject(reason: str) -> SliceBoxes:
        return SliceBoxes(index, None, predicted, reason)

    if not all(math.isfinite(v) for v in predicted):
        return reject("non-finite box coordinates")
    boxes: list[Box] = []
    for name, (x0, y0, x1, y1) in zip(
        ("image-left", "image-right"), (predicted[:4], predicted[4:]), strict=True
    ):
        if x1 - x0 < 1 or y1 - y0 < 1:
            return reject(f"{name} box has zero size")
        box = Box(_floor(x0), _floor(y0), _ceil(x1), _ceil(y1))
        inside = box.clip(rows, columns)
        if inside.area < MIN_INSIDE_FRACTION * box.area:
            return reject(f"{name} box lies outside the image")
        w, h = inside.width / columns, inside.height / rows
        if min(w, h) < rules.min_box_fraction:
            return reject(f"{name} box is too small ({inside.width}×{inside.height} px)")
        if max(w, h) > rules.max_box_fraction:
            return reject(f"{name} box is too large ({inside.width}×{inside.height} px)")
        boxes.append(inside)
    left, right = boxes
    if left.centre_x >= right.centre_x:
        return reject("sides swapped: the image-left box is right of the image-right box")
    if left.iou(right) > rules.max_iou:
        return reject(f"boxes overlap (IoU {left.iou(right):.2f} > {rules.max_iou})")
    return SliceBoxes(index, (left, right), predicted)


class Localizer:
    """The warm localiser: slices in, checked boxes out."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        prep = runner.spec.preprocessing
        assert isinstance(prep, LocalizerPreprocessing)
        self.rules = prep

    def prepare(
        self, pixels: npt.NDArray[np.float32], value_range: tuple[float, float] | None = None
    ) -> tuple[npt.NDArray[np.float32], Letterbox]:
        """The localiser input of one slice (thread-safe; runs in the decode threads)."""
        return localizer_slice(pixels, self.rules, self.runner.spec.input_size, value_range)

    def locate_prepared(
        self,
        items: list[tuple[int, npt.NDArray[np.float32], Letterbox, tuple[int, int]]],
    ) -> list[SliceBoxes]:
        """Boxes for prepared slices: (position index, input, placement, slice shape)."""
        if not items:
            return []
        inputs = np.stack([x for _, x, _, _ in items]).astype(np.float32)

        def forward(x: torch.Tensor) -> npt.NDArray[np.float32]:
            return self.runner.model(x).float().cpu().numpy()

        values = np.concatenate(self.runner.run(inputs, forward))
        return [
            check_boxes(index, _to_source(v, placement), shape, self.rules)
            for v, (index, _, placement, shape) in zip(values, items, strict=True)
        ]
