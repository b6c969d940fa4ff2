"""The MR paper's ROI patch (Lee et al. 2021 §2.2, Fig. 3) and its inverse for Grad-CAM.

From the left and right iliac-bone boxes of a slice:

1. each box is moved toward the sacrum (which lies between the ilia) by ``shift`` × its
   width (0.8 in the paper), so it covers the joint and half of the sacral side; the box on
   the image's left moves right, the box on the image's right moves left;
2. boxes are clipped to the image (a box at the edge loses the part outside);
3. the lower box's height is matched to the higher one: it grows about its centre, moved
   back inside the image where it would cross an edge;
4. the two patches are joined side by side (image-left patch first) and resized to
   ``size`` × ``size``.

:func:`patch_to_slice` maps a patch-space map back onto the two boxes of the slice.
Boxes are half-open pixel boxes: columns ``x0 <= x < x1``, rows ``y0 <= y < y1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Box:
    """A half-open pixel box (columns x, rows y)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(0, self.width) * max(0, self.height)

    @property
    def centre_x(self) -> float:
        return (self.x0 + self.x1) / 2.0

    def clip(self, rows: int, columns: int) -> Box:
        """The part inside a rows × columns image (may be empty)."""
        x0, x1 = min(max(self.x0, 0), columns), min(max(self.x1, 0), columns)
        y0, y1 = min(max(self.y0, 0), rows), min(max(self.y1, 0), rows)
        return Box(x0, y0, max(x0, x1), max(y0, y1))

    def iou(self, other: Box) -> float:
        """Intersection over union."""
        inter = Box(
            max(self.x0, other.x0),
            max(self.y0, other.y0),
            min(self.x1, other.x1),
            min(self.y1, other.y1),
        )
        i = inter.area if inter.width > 0 and inter.height > 0 else 0
        union = self.area + other.area - i
        return i / union if union > 0 else 0.0

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]

    def moved(self, dx: int, dy: int) -> Box:
        """The box translated by ``dx`` columns and ``dy`` rows."""
        return Box(self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy)


@dataclass(frozen=True)
class RoiBoxes:
    """The two final ROI boxes on the slice: image-left then image-right."""

    left: Box
    right: Box

    @property
    def joined_shape(self) -> tuple[int, int]:
        """(rows, columns) of the two patches side by side before the resize."""
        return max(self.left.height, self.right.height), self.left.width + self.right.width

    @property
    def union(self) -> Box:
        """The smallest box holding both boxes."""
        left, right = self.left, self.right
        return Box(
            min(left.x0, right.x0),
            min(left.y0, right.y0),
            max(left.x1, right.x1),
            max(left.y1, right.y1),
        )

    def moved(self, dx: int, dy: int) -> RoiBoxes:
        """Both boxes translated (onto a crop of the slice whose corner is ``(-dx, -dy)``)."""
        return RoiBoxes(self.left.moved(dx, dy), self.right.moved(dx, dy))


def _match_height(box: Box, height: int, rows: int) -> Box:
    if box.height >= height:
        return box
    extra = height - box.height
    top = box.y0 - extra // 2
    top = min(max(top, 0), max(rows - height, 0))
    return Box(box.x0, top, box.x1, min(top + height, rows))


def roi_boxes(
    image_left: Box, image_right: Box, shape: tuple[int, int], shift: float = 0.8
) -> RoiBoxes | None:
    """The paper's ROI boxes from the two iliac boxes; None if one leaves the image."""
    rows, columns = shape
    dl = round(shift * image_left.width)
    dr = round(shift * image_right.width)
    left = Box(image_left.x0 + dl, image_left.y0, image_left.x1 + dl, image_left.y1)
    right = Box(image_right.x0 - dr, image_right.y0, image_right.x1 - dr, image_right.y1)
    left, right = left.clip(rows, columns), right.clip(rows, columns)
    if left.area == 0 or right.area == 0:
        return None
    height = max(left.height, right.height)
    return RoiBoxes(_match_height(left, height, rows), _match_height(right, height, rows))


def roi_patch(image: Image, boxes: RoiBoxes, size: int) -> Image:
    """Crop both boxes, join them side by side, resize to ``size`` × ``size``."""
    height, _ = boxes.joined_shape
    parts = []
    for box in (boxes.left, boxes.right):
        crop = image[box.y0 : box.y1, box.x0 : box.x1]
        if crop.shape[0] < height:  # only when the image is lower than the box
            crop = np.pad(crop, ((0, height - crop.shape[0]), (0, 0)))
        parts.append(crop)
    joined = np.ascontiguousarray(np.hstack(parts), dtype=np.float32)
    shrink = joined.shape[0] > size or joined.shape[1] > size
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(joined, (size, size), interpolation=interpolation).astype(np.float32)


def patch_to_slice(values: Image, boxes: RoiBoxes, shape: tuple[int, int]) -> Image:
    """A patch-space map back onto the slice: resized to the joined shape, split, pasted
    into the two boxes (the maximum where they overlap); zero elsewhere."""
    height, width = boxes.joined_shape
    joined = cv2.resize(np.ascontiguousarray(values, dtype=np.float32), (width, height))
    out = np.zeros(shape, dtype=np.float32)
    left, right = boxes.left, boxes.right
    parts = ((left, joined[:, : left.width]), (right, joined[:, left.width :]))
    for box, part in parts:
        region = out[box.y0 : box.y1, box.x0 : box.x1]
        np.maximum(region, part[: box.height], out=region)
    return out
