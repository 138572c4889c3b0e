"""fedmed's NumPy metrics against scikit-learn's, the reference they replace."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

from fedmed.metrics import binary_auc, classification_metrics


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def random_case(rng, n, num_classes, dtype, rounded):
    logits = rng.normal(size=(n, num_classes)) * 2
    if rounded:  # many tied scores, and some probabilities that clip at 0 and 1
        logits = np.round(logits) * 20
    return rng.integers(0, num_classes, size=n), softmax(logits).astype(dtype)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("num_classes", [2, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rounded", [False, True])
def test_every_metric_equals_scikit_learns(num_classes, dtype, rounded):
    rng = np.random.default_rng(num_classes * 10 + rounded)
    for n in (7, 64, 501):
        labels, probs = random_case(rng, n, num_classes, dtype, rounded)
        ours = classification_metrics(labels, probs)
        classes = np.arange(num_classes)
        predictions = probs.argmax(axis=1)
        assert ours["loss"] == pytest.approx(log_loss(labels, probs, labels=classes), rel=1e-6)
        assert ours["accuracy"] == accuracy_score(labels, predictions)
        assert ours["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions), rel=1e-12)
        if len(np.unique(labels)) < num_classes:  # AUC undefined for a missing class
            assert ours["auc"] is None
            continue
        if num_classes == 2:
            reference = roc_auc_score(labels, probs[:, 1])
        else:
            reference = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes)
        assert ours["auc"] == pytest.approx(reference, rel=1e-12, abs=1e-12)


def test_auc_counts_ties_half_and_is_none_for_one_class():
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5
    assert binary_auc(np.array([True, True, False, False]), np.array([0.9, 0.4, 0.4, 0.1])) == pytest.approx(7 / 8)
    assert binary_auc(np.array([False, True]), np.array([0.9, 0.1])) == 0.0
    assert classification_metrics(np.zeros(4, dtype=int), softmax(np.ones((4, 2))))["auc"] is None


def test_a_class_only_predicted_counts_for_nothing_in_balanced_accuracy():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.1, 0.0, 0.9], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    predictions = probs.argmax(axis=1)  # class 2 predicted once, never the label
    with pytest.warns(UserWarning):  # scikit-learn warns about exactly this
        reference = balanced_accuracy_score(labels, predictions)
    assert classification_metrics(labels, probs)["balanced_accuracy"] == reference == 0.5
