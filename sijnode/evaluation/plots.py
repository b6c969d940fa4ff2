"""ROC and calibration plots as PNG files (matplotlib, Agg canvas, no pyplot state).

Both take plain data, so the audit (one curve per group) and the training tools (one curve
per fold) draw the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sijnode.evaluation.accuracy import as_labels, as_scores, roc_auc, roc_curve
from sijnode.evaluation.report import MetricsReport


@dataclass(frozen=True)
class RocSeries:
    """One ROC curve: its name in the legend, the reference labels, the scores, and the
    interval of its AUC if known (shown in the legend)."""

    name: str
    y_true: Any
    scores: Any
    auc_interval: tuple[float, float] | None = None


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(5.5, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def write_roc_png(series: Sequence[RocSeries], path: Path) -> Path:
    """One ROC curve per series, with its AUC (and interval) in the legend; a series with
    only one class has no curve and is left out."""
    fig, ax = _figure()
    for item in series:
        t = as_labels(item.y_true, "y_true")
        s = as_scores(item.scores, t.size)
        if t.all() or not t.any():
            continue
        fpr, tpr, _ = roc_curve(t, s)
        low, high = item.auc_interval or (math.nan, math.nan)
        ci = "" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]"
        # Straight segments between operating points: with tied scores this is the
        # curve whose area is the Mann–Whitney AUC.
        ax.plot(fpr, tpr, label=f"{item.name}: AUC {roc_auc(t, s):.3f}{ci}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("Sensitivity (true positive rate)")
    ax.set_title("ROC (research use only)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_calibration_png(reports: Sequence[MetricsReport], path: Path) -> Path:
    """Reliability diagram: observed fraction positive against mean predicted, per bin,
    one line per report (named by its group)."""
    fig, ax = _figure()
    for report in reports:
        bins = [b for b in report.calibration if b.count > 0]
        if not bins:
            continue
        ax.plot(
            [b.mean_predicted for b in bins],
            [b.observed_fraction for b in bins],
            marker="o",
            label=f"{report.group} (n={report.n}, Brier {report.brier:.3f})",
        )
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="perfect")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("Mean predicted probability")
    ax.set_ylabel("Observed fraction positive")
    ax.set_title("Calibration (research use only)")
    ax.legend(loc="upper left", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
