"""Robustness assessment: accuracy, balanced accuracy, AUC and attack success of a model under
evasion attacks.

Used by the server (global model on the test split) and by clients (their model on their
validation share). Images stay uint8 arrays (N, H, W, C) until a batch is drawn (docs/architecture.md);
each clean batch is gathered once and attacked with every (attack, eps) pair.

Metric names are part of the public contract (README, metrics.jsonl):
``adv/<attack>/<eps_key(eps)>/<metric>`` with metric ``accuracy``, ``balanced_accuracy``, ``auc``
and ``success_rate``, e.g. ``adv/fgsm/0.0314/accuracy`` for eps = 8/255.

Accuracy alone can flatter a model that answers one class for nearly everything: it keeps the
majority class's share under any attack. Balanced accuracy and AUC under attack, and the attack's
success on the images the model got right, are what say whether it resisted.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

from fedmed.evasion import attack_each_eps, eval_mode, make_attack
from fedmed.metrics import classification_metrics
from fedmed.seeds import derive_seed
from fedmed.train import BatchTransform, gather_batch

__all__ = ["CLEAN", "assess_robustness", "eps_key", "fixed_subset", "metric_key"]

CLEAN = "none"  # the "attack" under which the clean scores of the assessed images are named


def eps_key(eps: float) -> str:
    """The epsilon as it appears in metric names: four decimals (8/255 -> ``"0.0314"``)."""
    return f"{eps:.4f}"


def metric_key(attack: str, eps: float, metric: str) -> str:
    """``adv/<attack>/<eps_key>/<metric>``, e.g. ``adv/pgd/0.0314/accuracy``."""
    return f"adv/{attack}/{eps_key(eps)}/{metric}"


def fixed_subset(num_items: int, max_samples: int | None, seed: int) -> np.ndarray:
    """Indices 0..num_items-1, or a seeded, sorted random subset of ``max_samples`` of them.

    All indices when ``max_samples`` is None or not smaller than ``num_items``. The same
    arguments always give the same subset, so every round is assessed on the same images.
    """
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items!r}")
    if max_samples is None or max_samples >= num_items:
        return np.arange(num_items)
    if max_samples < 1:
        raise ValueError(f"max_samples must be None or >= 1, got {max_samples!r}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_items, size=int(max_samples), replace=False))


# An attack's epsilons share one batch (``attack_each_eps``) up to this many input values: the
# backward pass's activations grow with the batch.
ATTACK_BATCH_VALUES = 1 << 22


def _eps_groups(attacks: list[str], eps: list[float], x: torch.Tensor) -> list[tuple[str, list[float]]]:
    """(attack, epsilons attacked in one batch) pairs covering every attack and epsilon."""
    per_group = max(1, ATTACK_BATCH_VALUES // max(1, x.numel()))
    return [
        (name, [float(e) for e in eps[i : i + per_group]]) for name in attacks for i in range(0, len(eps), per_group)
    ]


def _name_id(text: str) -> int:
    """A stable integer for a string (Python's hash() is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))


def assess_robustness(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    attacks: list[str],
    eps: list[float],
    batch_size: int,
    device: torch.device,
    seed: int,
    transform: BatchTransform | None = None,
) -> dict[str, float | None]:
    """Accuracy, balanced accuracy, AUC and attack success of ``model`` on ``images[indices]``
    under each attack at each eps.

    Every batch is gathered once (``transform``, if given, applied to the clean batch as in
    :func:`fedmed.train.predict_probs`), attacked with each (attack, eps) pair (an attack's
    epsilons together in one batch, ``attack_each_eps``), and each adversarial batch classified
    in eval mode. The attack on batch ``b`` is seeded with
    ``derive_seed(seed, attack, eps, b)``, so the result depends only on the inputs and ``seed``.
    Returns, for each attack and eps, ``metric_key(attack, eps, m)`` for m in ``accuracy``,
    ``balanced_accuracy``, ``auc`` (None where it is undefined, e.g. a single class among the
    labels) and ``success_rate``: the share of the images classified correctly when clean that
    the attack makes wrong (None when none was correct). The clean scores on the same images are
    ``adv/none/0.0000/...`` (accuracy, balanced accuracy, AUC) — with a subset
    (``eval.max_samples``) they, not the whole split's, are what the attacks should be compared to.
    The model's train/eval mode is restored afterwards.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-d array, got shape {indices.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    pairs = [(name, float(e)) for name in attacks for e in eps]
    keys = [(name, eps_key(e)) for name, e in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(
            f"attacks {list(attacks)} and eps {list(eps)} repeat a metric name (eps are named with 4 decimals)"
        )
    for name, e in pairs:  # unknown names and bad eps fail before any work is done
        make_attack(name, e)

    all_labels = np.asarray(labels, dtype=np.int64)
    true_labels = all_labels[indices]
    label_tensor = torch.from_numpy(all_labels)
    probs: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in keys}
    clean_probs: list[torch.Tensor] = []

    model.to(device)
    with eval_mode(model):
        for batch_index, start in enumerate(range(0, len(indices), batch_size)):
            batch = indices[start : start + batch_size]
            x = gather_batch(images, batch, device)
            if transform is not None:
                x = transform(x)
            y = label_tensor[batch].to(device, non_blocking=True)
            with torch.no_grad():
                clean_probs.append(torch.softmax(model(x).double(), dim=1).cpu())
            for name, group in _eps_groups(attacks, eps, x):
                seeds = [derive_seed(seed, _name_id(name), _name_id(eps_key(e)), batch_index) for e in group]
                for e, x_adv in zip(group, attack_each_eps(name, group, seeds, model, x, y)):
                    with torch.no_grad():
                        probs[name, eps_key(e)].append(torch.softmax(model(x_adv).double(), dim=1).cpu())

    clean_scores = torch.cat(clean_probs).numpy()
    clean = classification_metrics(true_labels, clean_scores)
    right_when_clean = clean_scores.argmax(axis=1) == true_labels
    results: dict[str, float | None] = {
        metric_key(CLEAN, 0.0, metric): clean[metric] for metric in ("accuracy", "balanced_accuracy", "auc")
    }
    for name, e in pairs:
        scores = torch.cat(probs[name, eps_key(e)]).numpy()
        metrics = classification_metrics(true_labels, scores)
        for metric in ("accuracy", "balanced_accuracy", "auc"):
            results[metric_key(name, e, metric)] = metrics[metric]
        wrong_after = scores.argmax(axis=1) != true_labels
        results[metric_key(name, e, "success_rate")] = (
            float(wrong_after[right_when_clean].mean()) if right_when_clean.any() else None
        )
    return results
