"""Classification metrics from predicted probabilities (scikit-learn does the arithmetic)."""

from __future__ import annotations

import math

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Loss, accuracy, balanced accuracy and macro one-vs-rest AUC.

    ``probs`` is (N, num_classes). AUC is None when the labels hold a single class (it is
    undefined there), so that metrics.jsonl stays valid JSON.
    """
    # scikit-learn is slow to import: a deployed site pays for it only when it evaluates
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

    num_classes = probs.shape[1]
    predictions = probs.argmax(axis=1)
    class_ids = np.arange(num_classes)
    loss = log_loss(labels, probs, labels=class_ids)
    auc: float | None = None
    if len(np.unique(labels)) > 1:
        if num_classes == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        elif len(np.unique(labels)) == num_classes:
            auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=class_ids))
    return {
        "loss": float(loss),
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "auc": auc if auc is None or math.isfinite(auc) else None,
    }
