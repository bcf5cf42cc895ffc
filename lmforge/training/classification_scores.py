"""The scores of a classifier's predictions: accuracy, macro F1, per-class precision/recall, and
the confusion matrix. The fine-tuning loop scores every epoch's validation with them (early
stopping, the best checkpoint), so they live with training; lmforge/evaluation builds its reports
on them.

Labels are names (str); `labels` fixes their order in the per-class table and the matrix, so a
class absent from a split still gets a row (with zero support) rather than shifting the others.
"""

from __future__ import annotations

from typing import Sequence

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
