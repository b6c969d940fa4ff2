"""Tables in the papers' layouts and the training figures, from fold results.

- CT, Fu et al. 2024 Table 1: accuracy, AUC, recall, F1 (plus precision and specificity),
  mean ± sd over folds, one row per architecture.
- MR, Lee et al. 2021 Tables 2 and 3: accuracy, recall, precision, specificity, NPV, F1,
  mean ± sd over folds, slice level (whole image, ROI, ROI + median filter) and subject
  level.
- Training curves per architecture (CT Fig. 4): validation accuracy by epoch, mean over
  folds; ROC curves per fold (``sijnode.evaluation.plots``).

Metrics come from :mod:`sijnode.evaluation` (the audit uses the same functions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sijnode.evaluation import accuracy_at_threshold, summarise_folds

#: Fu et al. 2024 Table 1 columns, then the two sijnode adds.
TABLE1 = (
    ("Accuracy", "accuracy"),
    ("AUC", "roc_auc"),
    ("Recall", "sensitivity"),
    ("F1", "f1"),
    ("Precision", "ppv"),
    ("Specificity", "specificity"),
)
#: Lee et al. 2021 Tables 2 and 3 columns (AUC added).
TABLE23 = (
    ("Accuracy", "accuracy"),
    ("Recall", "sensitivity"),
    ("Precision", "ppv"),
    ("Specificity", "specificity"),
    ("NPV", "npv"),
    ("F1", "f1"),
    ("AUC", "roc_auc"),
)


def metrics(y_true: Any, scores: Any, threshold: float) -> dict[str, float]:
    """Every metric of ``sijnode.evaluation`` at ``threshold`` (AUC from the scores)."""
    return accuracy_at_threshold(np.asarray(y_true, dtype=bool), scores, threshold).as_dict()


def decision_metrics(y_true: Any, decisions: Any, scores: Any) -> dict[str, float]:
    """Metrics of given decisions (e.g. median-filtered), AUC from ``scores``."""
    out = accuracy_at_threshold(np.asarray(y_true, dtype=bool), np.asarray(decisions, float), 0.5)
    values = out.as_dict()
    values["roc_auc"] = metrics(y_true, scores, 0.5)["roc_auc"]
    return values


def fold_table(
    rows: Mapping[str, Sequence[Mapping[str, float]]],
    columns: Sequence[tuple[str, str]],
    first: str = "Model",
) -> str:
    """A markdown table: one row per entry, each cell mean ± sd over folds (per cent)."""
    header = f"| {first} | folds | " + " | ".join(c for c, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for name, folds in rows.items():
        summary = summarise_folds(list(folds), [k for _, k in columns])
        cells = [summary[k].format(scale=100.0) or "n/a" for _, k in columns]
        lines.append(f"| {name} | {len(folds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_curves_png(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    key: str,
    path: Path,
    ylabel: str,
    title: str,
) -> Path:
    """One line per entry: ``key`` by epoch, mean over the entry's folds (CT Fig. 4)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, folds in curves.items():
        length = min((len(h) for h in folds), default=0)
        if not length:
            continue
        values = np.array([[row.get(key, np.nan) for row in h[:length]] for h in folds], float)
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, np.nanmean(values, axis=0), marker="o", label=name)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} (research use only)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def roc_png(folds: Sequence[tuple[str, Any, Any]], path: Path) -> Path:
    """ROC curves, one per fold: (name, labels, scores)."""
    from sijnode.evaluation.plots import RocSeries, write_roc_png

    return write_roc_png([RocSeries(n, np.asarray(y, bool), s) for n, y, s in folds], path)
