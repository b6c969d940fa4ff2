"""ROC and calibration plots as PNG files (matplotlib, Agg canvas, no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sijnode.audit.validation import ValidationCase
from sijnode.evaluation.accuracy import MetricsReport, roc_curve


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(5.5, 5.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def write_roc_png(
    cases: Sequence[ValidationCase], reports: Sequence[MetricsReport], path: Path
) -> Path:
    """One ROC curve per group, with its AUC and 95% interval in the legend."""
    fig, ax = _figure()
    for report in reports:
        items = [c for c in cases if c.group == report.group]
        if report.positives == 0 or report.negatives == 0:
            continue
        fpr, tpr, _ = roc_curve([c.truth for c in items], [c.probability for c in items])
        auc = report.metric("roc_auc")
        ci = "" if math.isnan(auc.ci_low) else f" [{auc.ci_low:.3f}, {auc.ci_high:.3f}]"
        # Straight segments between operating points: with tied scores this is the
        # curve whose area is the Mann–Whitney AUC.
        ax.plot(fpr, tpr, label=f"{report.group}: AUC {auc.estimate:.3f}{ci}")
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
    """Reliability diagram: observed fraction positive against mean predicted, per bin."""
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
