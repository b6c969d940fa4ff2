"""The networks a spec names, built without weights (torchvision ``weights=None``).

- ``resnext50_32x4d``: ResNeXt-50 32x4d with a linear head of one logit (Fu et al. 2024).
- ``resnet18_hidden_head``: ResNet18 whose head has one hidden fully connected layer
  (``Linear -> ReLU -> Linear``), sigmoid applied to its logit (Lee et al. 2021 §2.3).
- ``resnet50_hidden_head``: ResNet50 with the same head, the MR paper's comparison network
  (``sijnode train mr --compare``).
- ``localizer_cnn_v1``: a small CNN regressing two iliac boxes (docs/models.md).
- ``vgg16``, ``resnet101``, ``densenet121``, ``inception_v4`` (timm): the CT paper's
  comparison networks, each with a linear head of one logit (``sijnode train ct --compare``).

Nothing is downloaded; weights come from a checkpoint (``checkpoint.load_model``) or are
seeded at random here for tests and benchmarks (``seeded_state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torchvision import models as tvm

from sijnode.errors import CheckpointError
from sijnode.models.spec import ModelSpec

#: Hidden units of the MR head (one hidden layer; the paper does not give the width).
MR_HIDDEN_UNITS = 256


class Features(NamedTuple):
    """What one inference forward gives, for the closed-form Grad-CAM (``models/cam.py``)."""

    logits: torch.Tensor  # (N,)
    activations: torch.Tensor  # (N, K, h, w): the last convolutional stage (layer4)
    pooled: torch.Tensor  # (N, K): global average of the activations
    hidden: torch.Tensor | None  # (N, H): pre-ReLU hidden layer of a hidden head


class HiddenHead(nn.Sequential):
    """``Linear(K, H) -> ReLU -> Linear(H, 1)``: the MR paper's one-hidden-layer head."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class LocalizerCNN(nn.Module):
    """Five conv blocks (/32), a 4×4 spatial map flattened (keeps position), two FC layers.

    Output: (N, 8) in [0, 1]: ``x0, y0, x1, y1`` of the box on the image's left half, then
    of the box on its right half, normalised to the input size.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        widths = (16, 32, 64, 96, 128)
        layers: list[nn.Module] = []
        previous = in_channels
        for k, width in enumerate(widths):
            # The first block halves the resolution by its stride (cheaper than conv + pool
            # at full resolution); the others pool.
            stride = 2 if k == 0 else 1
            layers += [
                nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if k > 0:
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * 16, 64), nn.ReLU(inplace=True), nn.Linear(64, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.pool(self.features(x))))


def _inception_v4() -> nn.Module:
    import timm

    return timm.create_model("inception_v4", pretrained=False, num_classes=1)


#: The CT paper's comparison networks (Fu et al. 2024), 3 channels in, one logit out.
COMPARISON_ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "vgg16": lambda: tvm.vgg16(weights=None, num_classes=1),
    "resnet101": lambda: tvm.resnet101(weights=None, num_classes=1),
    "densenet121": lambda: tvm.densenet121(weights=None, num_classes=1),
    "inception_v4": _inception_v4,
}


def build(spec: ModelSpec) -> nn.Module:
    """The untrained network of ``spec.architecture`` (on the current default device)."""
    channels = spec.preprocessing.channels
    if spec.architecture == "resnext50_32x4d":
        model: nn.Module = tvm.resnext50_32x4d(weights=None, num_classes=1)
    elif spec.architecture == "resnet18_hidden_head":
        model = tvm.resnet18(weights=None)
        model.fc = HiddenHead(512, MR_HIDDEN_UNITS)  # ResNet18 pooled features: 512
    elif spec.architecture == "resnet50_hidden_head":
        model = tvm.resnet50(weights=None)
        model.fc = HiddenHead(2048, MR_HIDDEN_UNITS)  # ResNet50 pooled features: 2048
    elif spec.architecture == "localizer_cnn_v1":
        return LocalizerCNN(channels)
    elif spec.architecture in COMPARISON_ARCHITECTURES:
        if channels != 3:
            raise CheckpointError(f"{spec.architecture} expects 3 input channels, got {channels}")
        return COMPARISON_ARCHITECTURES[spec.architecture]()
    else:
        raise CheckpointError(f"unknown architecture {spec.architecture!r}")
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return model


def forward_features(model: nn.Module, x: torch.Tensor) -> Features:
    """torchvision ResNet's forward, keeping layer4, the pooled features and the hidden layer.

    The same operations as ``ResNet.forward`` (torchvision ``_forward_impl``), so the logits
    equal ``model(x)``; no hooks, no second pass.
    """
    m = model
    a = m.maxpool(m.relu(m.bn1(m.conv1(x))))  # type: ignore[operator]
    a = m.layer4(m.layer3(m.layer2(m.layer1(a))))  # type: ignore[operator]
    pooled = torch.flatten(m.avgpool(a), 1)  # type: ignore[operator]
    head = m.fc
    if isinstance(head, HiddenHead):
        hidden = head[0](pooled)
        logits = head[2](torch.relu(hidden))
    else:
        hidden = None
        logits = head(pooled)  # type: ignore[operator]
    return Features(logits.reshape(-1), a, pooled, hidden)


def seeded_state_dict(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random weights from a fixed seed (tests, benchmarks); training is another issue.

    Batch-norm statistics are perturbed too, so a golden test exercises them.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(spec)
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("running_var"):
            state[name] = 1.0 + 0.1 * torch.rand(tensor.shape, generator=generator)
        elif name.endswith("running_mean"):
            state[name] = 0.05 * torch.randn(tensor.shape, generator=generator)
    return state


def fixed_box_localizer_state(
    spec: ModelSpec, boxes: tuple[float, ...], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Localiser weights that predict the same 8 normalised coordinates for every slice.

    Seeded features, a zero last layer whose bias is ``logit(boxes)``: a deterministic
    stand-in for a trained localiser in tests and benchmarks (training is another issue).
    """
    if len(boxes) != 8 or not all(0.0 < v < 1.0 for v in boxes):
        raise ValueError(f"expected 8 normalised coordinates in (0, 1), got {boxes}")
    state = seeded_state_dict(spec, seed)
    target = torch.tensor(boxes, dtype=torch.float32)
    state["head.3.weight"] = torch.zeros_like(state["head.3.weight"])
    state["head.3.bias"] = torch.log(target / (1.0 - target))
    return state
