"""A classifier's report beside its scores (lmforge/training/classification_scores.py): the
majority-class floor, the flat metrics the trackers take, and the confusion matrix drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def majority_accuracy(y_train: Sequence[str], y_eval: Sequence[str]) -> float:
    """Accuracy of always predicting the most frequent training label (the floor to beat)."""
    values, counts = np.unique(np.asarray(list(y_train)), return_counts=True)
    majority = values[int(np.argmax(counts))]
    return float(np.mean(np.asarray(list(y_eval)) == majority))


def tracked_scores(metrics: dict, prefix: str) -> dict[str, float]:
    """The figures of a classification_metrics dict that the trackers chart, under flat keys:
    test_accuracy, test_macro_f1, test_precision_positive, ..."""
    out = {f"{prefix}_accuracy": metrics["accuracy"], f"{prefix}_macro_f1": metrics["macro_f1"]}
    for name, row in metrics["per_class"].items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
        out[f"{prefix}_precision_{safe}"] = row["precision"]
        out[f"{prefix}_recall_{safe}"] = row["recall"]
    return out


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path | str,
                          title: str = "confusion matrix") -> Path:
    """Draw the matrix (counts, with row-normalised shading) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(3.5, 0.9 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
