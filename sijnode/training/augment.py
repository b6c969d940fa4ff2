"""Training augmentations with albumentations, named as in the papers.

- CT (Fu et al. 2024, Methods): vertical flip, random fog, random brightness and contrast,
  random crop, random rotate, random RGB shift. The crop is taken at 90 % of the side and
  resized back, so the input size stays the spec's.
- MR (Lee et al. 2021 §2.3): horizontal flip and rotation only; no random crop, which can
  cut the lesion out of the ROI patch.
- Localiser (sijnode's own): horizontal flip with the two boxes swapped, random scaling and
  translation, moving image and boxes together (:func:`localizer_augmentation`).

Set ``NO_ALBUMENTATIONS_UPDATE=1``: albumentations checks for updates over the network on
import otherwise. :func:`ct_augmentation` and :func:`mr_augmentation` set it themselves.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt


def _albumentations() -> Any:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def ct_augmentation(size: int, seed: int) -> Any:
    """The CT paper's list, on HxWx3 uint8 images of ``size`` × ``size``."""
    A = _albumentations()
    crop = max(1, round(size * 0.9))
    return A.Compose(
        [
            A.VerticalFlip(p=0.5),
            A.RandomFog(fog_coef_range=(0.05, 0.2), p=0.2),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.Compose([A.RandomCrop(crop, crop), A.Resize(size, size)], p=0.3),
            A.Rotate(limit=10, p=0.5),
            A.RGBShift(r_shift_limit=10, g_shift_limit=10, b_shift_limit=10, p=0.2),
        ],
        seed=seed,
    )


def mr_augmentation(seed: int) -> Any:
    """Horizontal flip and rotation only (the MR paper's choice)."""
    A = _albumentations()
    return A.Compose([A.HorizontalFlip(p=0.5), A.Rotate(limit=10, p=0.5)], seed=seed)


def localizer_augmentation(
    image: npt.NDArray[np.float32],
    target: npt.NDArray[np.float32],
    rng: np.random.Generator,
    pad_value: float,
    shift: float = 0.06,
    scale: tuple[float, float] = (0.9, 1.1),
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """A localiser input (1, S, S) and its 8 box targets, moved together.

    Horizontal flip with the boxes swapped (the image-left box of the flipped slice is the
    mirrored image-right box), then one random scaling about the centre and translation
    (up to ``shift`` of the side); both keep boxes axis-aligned, so the targets stay exact.
    A rotation would not (docs/training.md). ``pad_value`` fills what moves in from outside
    (the normalised letterbox padding).
    """
    import cv2

    x = image[0]
    boxes = target.reshape(2, 4).astype(np.float64)
    if rng.random() < 0.5:
        x = x[:, ::-1]
        boxes = np.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], 1)[::-1]
    s = float(rng.uniform(*scale))
    tx, ty = (float(v) for v in rng.uniform(-shift, shift, 2))
    height, width = x.shape
    # Normalised coordinate u -> s (u - 0.5) + 0.5 + t; in pixels of the input grid.
    matrix = np.array(
        [
            [s, 0.0, (0.5 - 0.5 * s + tx) * width],
            [0.0, s, (0.5 - 0.5 * s + ty) * height],
        ]
    )
    moved = cv2.warpAffine(
        np.ascontiguousarray(x, dtype=np.float32),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=float(pad_value),
    )
    boxes[:, [0, 2]] = s * (boxes[:, [0, 2]] - 0.5) + 0.5 + tx
    boxes[:, [1, 3]] = s * (boxes[:, [1, 3]] - 0.5) + 0.5 + ty
    out = np.clip(boxes.reshape(8), 0.0, 1.0).astype(np.float32)
    return moved[None].astype(np.float32), out
