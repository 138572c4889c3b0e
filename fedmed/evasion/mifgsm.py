"""MI-FGSM: sign steps along a momentum of normalised gradients (Dong et al. 2018)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fedmed.evasion._common import DEFAULT_STEPS, iterative_from_clean
from fedmed.evasion.base import EvasionAttack, from_clean_each_eps


def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    decay: float = 1.0,
    targeted: bool = False,
) -> torch.Tensor:
    """Momentum Iterative FGSM: sign steps along an accumulated gradient
    ``g <- decay * g + grad / mean|grad|`` (normalised per sample), projected onto the L-inf
    ``eps`` ball and clamped to [0, 1] after every step.

    Dong, Liao, Pang, Su, Zhu, Hu, Li, "Boosting Adversarial Attacks with Momentum", CVPR 2018
    (arXiv:1710.06081). Default ``alpha = eps / steps`` and ``decay = 1.0`` as in the paper.
    Same definition as ``torchattacks.MIFGSM`` (whose default alpha is 2/255 instead).
    """
    decay = float(decay)
    if not decay >= 0 or decay == float("inf"):
        raise ValueError(f"decay must be a finite number >= 0, got {decay!r}")
    return iterative_from_clean(model, x, y, eps=eps, steps=steps, alpha=alpha, decay=decay, targeted=targeted)


ATTACK = EvasionAttack("mifgsm", mifgsm, each_eps=partial(from_clean_each_eps, decay=1.0))
