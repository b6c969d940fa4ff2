"""Mean ± standard deviation of metrics over cross-validation folds.

The MR paper reports every metric as mean ± sd over its 5 folds, the CT paper averages
over 10 folds (Lee et al. 2021, Table 2; Fu et al. 2024; docs in PROTOCOLS.md). The sd is
the sample standard deviation (``ddof=1``) unless asked otherwise; a fold whose metric is
undefined (NaN) is left out and the count of folds used is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sijnode.errors import EvaluationError


@dataclass(frozen=True)
class MeanSd:
    """The mean and standard deviation of one metric over ``n`` folds."""

    mean: float
    sd: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        """``"93.55 ± 2.19"`` (``scale=100`` for percentages); empty when undefined."""
        if math.isnan(self.mean):
            return ""
        sd = "" if math.isnan(self.sd) else f" ± {self.sd * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f}{sd}"


def mean_sd(values: Iterable[float], ddof: int = 1) -> MeanSd:
    """Mean and standard deviation of the finite ``values`` (NaN when too few)."""
    if ddof < 0:
        raise EvaluationError(f"expected ddof >= 0, got {ddof}")
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    mean = float(arr.mean()) if n else math.nan
    sd = float(arr.std(ddof=ddof)) if n > ddof else math.nan
    return MeanSd(mean=mean, sd=sd, n=n)


def summarise_folds(
    folds: Sequence[Mapping[str, float]], names: Sequence[str] | None = None, ddof: int = 1
) -> dict[str, MeanSd]:
    """Mean ± sd of each metric over ``folds`` (one mapping of metric to value per fold,
    e.g. :meth:`~sijnode.evaluation.accuracy.Accuracy.as_dict`), in ``names`` order
    (default: the first fold's). A fold that lacks a metric is an error."""
    if not folds:
        raise EvaluationError("expected at least one fold, got none")
    wanted = list(names) if names is not None else list(folds[0])
    out: dict[str, MeanSd] = {}
    for name in wanted:
        missing = [i for i, fold in enumerate(folds) if name not in fold]
        if missing:
            raise EvaluationError(f"expected {name!r} in every fold, missing in folds {missing}")
        out[name] = mean_sd((fold[name] for fold in folds), ddof=ddof)
    return out
