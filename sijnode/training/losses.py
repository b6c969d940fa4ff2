"""Losses and learning-rate schedules of the two papers.

- Focal loss (Lin et al. 2017), used by Lee et al. 2021 §2.3 for the MR ROI classifier:
  ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` on the sigmoid output.
- Cosine learning-rate decay from 0.03 (Lee et al. 2021 §2.3), through torch's own
  ``CosineAnnealingLR``: ``lr_t = lr_min + (lr_0 - lr_min) (1 + cos(pi t / T)) / 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    alpha: float | None = 0.25,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary focal loss on logits (numerically stable through BCE-with-logits)."""
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, lr_min: float = 0.0
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Cosine decay of every parameter group's learning rate over ``total_steps`` steps."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps), eta_min=lr_min
    )
