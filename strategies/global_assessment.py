"""Global robustness assessment: how the global model holds up under evasion attacks.

Every ``eval.every`` rounds (round 0 included) and after the last round, the server attacks the
global model on the test split (or a fixed, seeded subset of ``eval.max_samples`` images) with
each of ``eval.attacks`` at each of ``eval.eps``, and the clients report the same on their own
validation shares; the weakest site's robust accuracy goes into the round's row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmed.adversarial_eval import assess_robustness, eps_key, fixed_subset
from fedmed.evasion import check_attack_names

VAL_PREFIX = "val_"


def is_assessment_round(server_round: int, every: int, total_rounds: int, attacks: list[str]) -> bool:
    if not attacks:
        return False
    return server_round % max(1, every) == 0 or server_round == total_rounds


def check_eval_config(attacks: list[str], eps: list[float], max_samples: int | None) -> None:
    """Unknown attack names and bad epsilons fail before the run starts."""
    check_attack_names(attacks)
    for value in eps:
        if not 0 < value <= 1:
            raise ValueError(f"eval.eps contains {value}; epsilons are in pixel scale (0, 1], e.g. 8/255 = 0.0314")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"eval.max_samples={max_samples} must be >= 1 (or null for the whole test split)")


def global_robustness(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    attacks: list[str],
    eps: list[float],
    max_samples: int | None,
    batch_size: int,
    device: torch.device,
    seed: int,
) -> dict[str, float | None]:
    """``adv/<attack>/<eps>/accuracy`` and ``.../auc`` of the global model on the test split."""
    indices = fixed_subset(len(labels), max_samples, seed)
    return assess_robustness(
        model, images, labels, indices, attacks=attacks, eps=eps, batch_size=batch_size, device=device, seed=seed
    )


def weakest_client(client_eval: list[dict], attacks: list[str], eps: list[float]) -> dict[str, float]:
    """Per attack and epsilon, the lowest robust accuracy any client measured on its own data,
    as ``adv/<attack>/<eps>/worst_client_accuracy``."""
    row = {}
    for attack in attacks:
        for value in eps:
            key = f"adv/{attack}/{eps_key(value)}/accuracy"
            scores = [c[VAL_PREFIX + key] for c in client_eval if c.get(VAL_PREFIX + key) is not None]
            if scores:
                row[key.replace("/accuracy", "/worst_client_accuracy")] = min(scores)
    return row
