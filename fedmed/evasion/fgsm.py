"""FGSM: one signed gradient step of size eps."""

from __future__ import annotations

import torch
from torch import nn

from fedmed.evasion._common import check_eps, check_inputs, eval_mode, input_grad
from fedmed.evasion.base import Copies, EvasionAttack


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False) -> torch.Tensor:
    """Fast Gradient Sign Method: one step ``x + eps * sign(grad)``, clamped to [0, 1].

    Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015
    (arXiv:1412.6572). Identical, bit for bit, to ``torchattacks.FGSM``.
    """
    eps = check_eps(eps)
    check_inputs(x, y)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        grad = input_grad(model, x, y, targeted)
    return torch.clamp(x.detach() + eps * grad.sign(), 0.0, 1.0).detach()


def each_eps(model: nn.Module, copies: Copies) -> torch.Tensor:
    grad = input_grad(model, copies.xs, copies.ys, False, copies=copies.count)
    return torch.clamp(copies.xs + copies.eps * grad.sign(), 0.0, 1.0).detach()


ATTACK = EvasionAttack("fgsm", fgsm, each_eps=each_eps)
