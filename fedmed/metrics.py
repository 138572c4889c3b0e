"""Classification metrics from predicted probabilities, in NumPy.

Written by hand, not taken from scikit-learn: importing ``sklearn.metrics`` costs about 1.5 s of
CPU, and every process that evaluates pays it, so every client actor of every simulated run (and
each deployed site). The arithmetic is scikit-learn's own, and ``tests/test_metrics.py`` checks
every value against ``log_loss``, ``accuracy_score``, ``balanced_accuracy_score`` and
``roc_auc_score``.
"""

from __future__ import annotations

import math

import numpy as np


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-probability of the true class, probabilities clipped to [eps, 1 - eps]
    of their dtype (scikit-learn's ``log_loss``)."""
    eps = np.finfo(probs.dtype).eps
    true_class = np.clip(probs[np.arange(len(labels)), labels], eps, 1 - eps)
    return float(-np.mean(np.log(true_class)))


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean recall over the classes present in ``labels`` (scikit-learn's
    ``balanced_accuracy_score``: a class that is only predicted counts for nothing)."""
    classes, class_of_sample = np.unique(labels, return_inverse=True)
    hits = np.bincount(class_of_sample, weights=predictions == labels, minlength=len(classes))
    return float(np.mean(hits / np.bincount(class_of_sample, minlength=len(classes))))


def binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic, ties counted half (what the
    trapezoidal area of scikit-learn's ``roc_auc_score`` equals). Both classes must occur."""
    _, value_of_sample, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    rank_sum = average_rank[value_of_sample][is_positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """Loss, accuracy, balanced accuracy and macro one-vs-rest AUC.

    ``probs`` is (N, num_classes). AUC is None when the labels hold a single class (it is
    undefined there) or, with more than two classes, miss one of them, so that metrics.jsonl
    stays valid JSON.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    predictions = probs.argmax(axis=1)
    present = np.unique(labels)
    auc: float | None = None
    if len(present) > 1:
        scores = probs.astype(np.float64)
        if num_classes == 2:
            auc = binary_auc(labels == 1, scores[:, 1])
        elif len(present) == num_classes:
            auc = float(np.mean([binary_auc(labels == k, scores[:, k]) for k in range(num_classes)]))
    return {
        "loss": log_loss(labels, probs),
        "accuracy": float(np.mean(predictions == labels)),
        "balanced_accuracy": balanced_accuracy(labels, predictions),
        "auc": auc if auc is None or math.isfinite(auc) else None,
    }
