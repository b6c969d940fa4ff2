"""From ordered slice results to a study (CT) or subject (MR) decision.

- :func:`median_filter`: a size-``n`` running median along the ordered slices; the ends
  repeat the first and last value ("nearest"), so a filter never invents zeros there.
- CT (``median_topk_mean``): the paper classifies single images (Fu et al. 2024), a node
  decides per study: median-filter the slice probabilities, take the mean of the ``k``
  highest filtered ones (all of them for shorter series) and compare with the study
  threshold. The filter keeps a lone outlier slice from deciding; the top-k mean keeps a
  short lesion run in a long series from being averaged away.
- MR (``median_decisions_mean``, Lee et al. 2021 §2.4): slice decision at the slice
  threshold, size-3 median filter of the decisions from the lower to the upper pelvis, the
  subject result is the mean of the filtered decisions against the subject threshold; the
  subject probability reported with it is the mean of the median-filtered probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def median_filter(values: npt.ArrayLike, size: int = 3) -> Array:
    """Running median of odd ``size`` with the ends repeated (``nearest``)."""
    data = np.asarray(values, dtype=np.float64)
    if size % 2 != 1 or size < 1:
        raise ValueError(f"median filter size must be odd and positive, got {size}")
    if data.size == 0 or size == 1:
        return data.copy()
    half = size // 2
    padded = np.pad(data, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, size)
    return np.median(windows, axis=1)


@dataclass(frozen=True)
class StudyAggregate:
    """CT: filtered slice probabilities and the study score and decision."""

    filtered: Array
    score: float
    positive: bool
    top_indices: tuple[int, ...]


def ct_study(
    probabilities: npt.ArrayLike, study_threshold: float, median_size: int = 3, top_k: int = 3
) -> StudyAggregate:
    """Median filter, then the mean of the top-k filtered probabilities, vs the threshold."""
    filtered = median_filter(probabilities, median_size)
    if filtered.size == 0:
        raise ValueError("a study decision needs at least one slice")
    k = min(top_k, filtered.size)
    order = np.argsort(-filtered, kind="stable")[:k]
    score = float(filtered[order].mean())
    return StudyAggregate(filtered, score, score >= study_threshold, tuple(int(i) for i in order))


@dataclass(frozen=True)
class SubjectAggregate:
    """MR: slice decisions, their filtered version, the subject result and probability."""

    decisions: Array
    filtered_decisions: Array
    filtered_probabilities: Array
    #: Mean of the filtered decisions (compared with the subject threshold).
    result: float
    #: Mean of the median-filtered probabilities.
    probability: float
    positive: bool


def mr_subject(
    probabilities: npt.ArrayLike,
    slice_threshold: float,
    subject_threshold: float,
    median_size: int = 3,
) -> SubjectAggregate:
    """Lee et al. 2021 §2.4 on slice probabilities ordered lower to upper pelvis."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.size == 0:
        raise ValueError("a subject decision needs at least one slice")
    decisions = (p >= slice_threshold).astype(np.float64)
    filtered = median_filter(decisions, median_size)
    filtered_p = median_filter(p, median_size)
    result = float(filtered.mean())
    return SubjectAggregate(
        decisions,
        filtered,
        filtered_p,
        result,
        float(np.clip(filtered_p.mean(), 0.0, 1.0)),
        result >= subject_threshold,
    )
