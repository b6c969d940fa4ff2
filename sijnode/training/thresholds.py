"""Operating points chosen on validation data (PROTOCOLS.md C: a recorded operating point).

Default rule, **Youden's J**: the ROC point that maximises sensitivity + specificity - 1 on
the validation cases; ties go to the higher threshold. With ``target_sensitivity`` (triage):
the highest threshold whose validation sensitivity reaches the target. The threshold is
placed halfway between the chosen score and the next lower validation score, so a case
scoring exactly like the lowest accepted positive is still positive and the boundary is
not glued to one validation case. A score at or above the threshold is positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sijnode.evaluation.accuracy import as_labels, as_scores, roc_curve


@dataclass(frozen=True)
class Threshold:
    value: float
    rule: str
    sensitivity: float
    specificity: float


def choose_threshold(
    y_true: Any, scores: Any, target_sensitivity: float | None = None
) -> Threshold:
    """The operating point of :mod:`this module's <sijnode.training.thresholds>` rule."""
    t = as_labels(y_true, "y_true")
    s = as_scores(scores, t.size)
    if t.all() or not t.any():
        return Threshold(0.5, "0.5 (validation has one class only)", float("nan"), float("nan"))
    fpr, tpr, thresholds = roc_curve(t, s)
    candidates = np.arange(1, len(thresholds))  # skip the (0, 0) point at +inf
    if target_sensitivity is None:
        j = tpr[candidates] - fpr[candidates]
        k = int(candidates[int(np.argmax(j))])  # first maximum: the highest threshold
        rule = "Youden's J on the validation ROC"
    else:
        ok = candidates[tpr[candidates] >= target_sensitivity - 1e-12]
        k = int(ok[0]) if ok.size else int(candidates[-1])
        rule = f"highest threshold with validation sensitivity >= {target_sensitivity}"
    chosen = float(thresholds[k])
    lower = s[s < chosen]
    value = (chosen + float(lower.max())) / 2.0 if lower.size else chosen
    return Threshold(float(np.clip(value, 0.0, 1.0)), rule, float(tpr[k]), float(1 - fpr[k]))
