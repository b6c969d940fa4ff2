"""Training augmentations with albumentations, named as in the papers.

- CT (Fu et al. 2024, Methods): vertical flip, random fog, random brightness and contrast,
  random crop, random rotate, random RGB shift. The crop is taken at 90 % of the side and
  resized back, so the input size stays the spec's.
- MR (Lee et al. 2021 §2.3): horizontal flip and rotation only; no random crop, which can
  cut the lesion out of the ROI patch.

Set ``NO_ALBUMENTATIONS_UPDATE=1``: albumentations checks for updates over the network on
import otherwise. :func:`ct_augmentation` and :func:`mr_augmentation` set it themselves.
"""

from __future__ import annotations

import os
from typing import Any


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
