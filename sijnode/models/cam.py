"""Exact Grad-CAM in closed form from the inference forward's activations.

Grad-CAM of the last convolutional stage ``A`` (layer4, K×h×w) for the logit ``z`` is
``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ``∂z/∂A_k``. After global average
pooling ``p = mean(A)``, ``∂z/∂A_k(i, j) = (∂z/∂p_k) / (h·w)``, so ``α_k = (∂z/∂p_k)/(h·w)``:

- linear head ``z = w·p + b``: ``∂z/∂p = w`` (the head's weights, the same for every image);
- one hidden layer ``z = W2·ReLU(W1·p + b1) + b2``: ``∂z/∂p = W1ᵀ (W2 ⊙ 1[h > 0])``, per
  image, from the hidden pre-activation ``h`` of the same forward.

The positive factor ``1/(h·w)`` and the sigmoid's positive derivative vanish in the
min-max normalisation, so the maps equal pytorch-grad-cam's (``tests/test_models_cam.py``)
with no backward and no second forward (DICOM-OUTPUTS.md, "Grad-CAM in closed form").
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from sijnode.models.architectures import Features, HiddenHead
from sijnode.models.result import Region

EPS = 1e-7


def channel_weights(head: nn.Module, features: Features) -> torch.Tensor:
    """(N, K) gradient of the logit with respect to the pooled features."""
    if isinstance(head, HiddenHead):
        first, last = head[0], head[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        w1 = first.weight  # (H, K)
        w2 = last.weight[0]  # (H,)
        assert features.hidden is not None
        gate = (features.hidden > 0).to(w2.dtype) * w2  # (N, H)
        return gate @ w1
    if isinstance(head, nn.Linear):
        return head.weight[0].expand(features.pooled.shape[0], -1)
    raise TypeError(f"closed-form Grad-CAM needs a Linear or HiddenHead head, got {type(head)}")


def raw_cams(
    head: nn.Module, features: Features, index: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, h, w) float32 ``ReLU(Σ_k α_k A_k)`` (unnormalised) for the images ``index``."""
    weights = channel_weights(head, features)
    activations = features.activations
    if index is not None:
        weights, activations = weights[index], activations[index]
    cams = torch.einsum("nk,nkhw->nhw", weights.detach().float(), activations.detach().float())
    return torch.relu(cams)


def normalise(cam: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """pytorch-grad-cam's ``scale_cam_image``: minus the minimum, over the maximum."""
    cam = cam - cam.min()
    return (cam / (EPS + cam.max())).astype(np.float32)


def upsample(cam: npt.NDArray[np.float32], input_size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """The normalised map at the network input size, normalised again (as the package)."""
    height, width = input_size
    resized = cv2.resize(normalise(cam), (width, height)).astype(np.float32)
    return normalise(resized)


def to_uint8(values: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """[0, 1] -> uint8 with 255 at the map's maximum."""
    peak = float(values.max()) if values.size else 0.0
    scaled = values / peak if peak > 0 else values
    return np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)


def peak_region(heatmap: npt.NDArray[np.uint8], level: float = 0.5) -> Region:
    """Bounding box of the connected region at ≥ ``level`` of the peak holding the peak."""
    rows, columns = heatmap.shape
    peak = int(heatmap.max())
    if peak == 0:
        return Region(0.0, 0.0, float(columns), float(rows))
    mask = (heatmap >= max(1, int(np.ceil(level * peak)))).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    ys, xs = np.nonzero(labels == labels[r, c])
    return Region(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
