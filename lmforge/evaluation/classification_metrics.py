"""Metrics of a text classifier: accuracy, macro F1, per-class precision/recall, confusion matrix.

Labels are names (str); `labels` fixes their order in the per-class table and the matrix, so a
class absent from a split still gets a row (with zero support) rather than shifting the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Return a JSON-ready dict: accuracy, macro_f1, per_class {label: precision/recall/f1/support},
    confusion_matrix (rows: true label, columns: predicted, in `labels` order) and n."""
    labels = list(labels)
    y_true = list(y_true)
    y_pred = list(y_pred)
    if not y_true:
        raise ValueError("no examples to score")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def majority_accuracy(y_train: Sequence[str], y_eval: Sequence[str]) -> float:
    """Accuracy of always predicting the most frequent training label (the floor to beat)."""
    values, counts = np.unique(np.asarray(list(y_train)), return_counts=True)
    majority = values[int(np.argmax(counts))]
    return float(np.mean(np.asarray(list(y_eval)) == majority))


def flat_metrics(metrics: dict, prefix: str) -> dict[str, float]:
    """Flatten a classification_metrics dict to MLflow-style scalar keys: test_accuracy,
    test_precision_positive, ..."""
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
