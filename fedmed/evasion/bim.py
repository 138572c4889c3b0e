"""BIM (iterative FGSM): sign steps from the clean image, clipped to the eps ball."""

from __future__ import annotations

import torch
from torch import nn

from fedmed.evasion._common import DEFAULT_STEPS, iterative_from_clean
from fedmed.evasion.base import EvasionAttack, from_clean_each_eps


def bim(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    targeted: bool = False,
) -> torch.Tensor:
    """Basic Iterative Method (iterative FGSM): ``steps`` sign steps of size ``alpha`` from the
    clean image, each followed by clipping to the L-inf ``eps`` ball and to [0, 1].

    Kurakin, Goodfellow, Bengio, "Adversarial Examples in the Physical World", ICLR 2017 workshop
    (arXiv:1607.02533). The paper uses alpha = 1/255 and min(255*eps + 4, 1.25*255*eps) steps;
    with a fixed number of steps we default to ``alpha = eps / steps`` (as Dong et al. 2018 do for
    I-FGSM), so that ``steps`` aligned steps just reach the boundary of the ball.
    Same update as ``torchattacks.BIM`` given the same ``alpha`` and ``steps``.
    """
    return iterative_from_clean(model, x, y, eps=eps, steps=steps, alpha=alpha, decay=None, targeted=targeted)


ATTACK = EvasionAttack("bim", bim, each_eps=from_clean_each_eps)
