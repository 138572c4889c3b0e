"""PGD (Madry et al. 2018) in the L-inf ball (``pgd``, and ``pgd<k>`` with k steps) and in the L2
ball (``pgd_l2``), from a random start."""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from fedmed.evasion._common import (
    DEFAULT_STEPS,
    check_alpha,
    check_eps,
    check_inputs,
    check_steps,
    eval_mode,
    input_grad,
    l2_norms,
    per_sample,
    project,
    sign_step_attack,
)
from fedmed.evasion.base import AttackFamily, Copies, EvasionAttack

NORMS: tuple[str, ...] = ("linf", "l2")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = DEFAULT_STEPS,
    alpha: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    init_delta: torch.Tensor | None = None,
    targeted: bool = False,
) -> torch.Tensor:
    """Projected Gradient Descent in the L-inf or L2 ball of radius ``eps``.

    Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018 (arXiv:1706.06083).

    Start: ``x + init_delta`` when given (projected onto the ball), else with ``random_start`` a
    random point of the ball drawn with ``generator`` (a ``torch.Generator`` on ``x``'s device;
    None uses torch's global generator), else ``x`` itself; the start is clamped to [0, 1].
    L-inf start: uniform in the cube. L2 start: a uniformly random direction with a radius
    uniform in [0, eps] (as ``torchattacks.PGDL2``; not uniform in volume, which in these
    dimensions would put every start on the sphere).

    Steps (``steps`` of them, size ``alpha``, default ``2.5 * eps / steps``, the rule of thumb of
    Madry et al.'s robustness library): L-inf ``x_adv + alpha * sign(grad)``; L2
    ``x_adv + alpha * grad / ||grad||_2`` per sample. Each is followed by projection onto the
    ball and clamping to [0, 1]. With the same start, L-inf matches ``torchattacks.PGD`` and L2
    ``torchattacks.PGDL2`` (which adds 1e-10 to the gradient norm instead of guarding zero).
    """
    eps = check_eps(eps)
    steps = check_steps(steps)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    alpha = check_alpha(alpha, 2.5 * eps / steps)
    check_inputs(x, y)
    if init_delta is not None and init_delta.shape != x.shape:
        raise ValueError(f"init_delta must have the shape of x {tuple(x.shape)}, got {tuple(init_delta.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, x on {x.device}; they must match")
    if eps == 0:
        return x.detach().clone()
    x = x.detach()

    if init_delta is not None:
        x_start = project(x, x + init_delta.detach().to(x), eps, norm)
    elif random_start:
        if norm == "linf":
            delta = _linf_start(x, eps, generator)
        else:
            direction = torch.empty_like(x).normal_(generator=generator)
            radius = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(0, 1, generator=generator)
            delta = direction / l2_norms(direction) * per_sample(radius, x.ndim) * eps
        x_start = torch.clamp(x + delta, 0.0, 1.0)
    else:
        x_start = x

    with eval_mode(model):
        if norm == "linf":
            return sign_step_attack(
                model, x, y, x_start, eps=eps, steps=steps, alpha=alpha, decay=None, targeted=targeted
            )
        x_adv = x_start
        for _ in range(steps):
            grad = input_grad(model, x_adv, y, targeted)
            direction = grad / l2_norms(grad).clamp_min(torch.finfo(grad.dtype).tiny)
            x_adv = project(x, x_adv.detach() + alpha * direction, eps, "l2")
        return x_adv


def _linf_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.empty_like(x).uniform_(-eps, eps, generator=generator)


def linf_each_eps(model: nn.Module, copies: Copies, *, steps: int) -> torch.Tensor:
    """Every radius of L-inf PGD: each copy's random start from its own generator, as pgd() draws it."""
    starts = [_linf_start(copies.x, e, g) for e, g in zip(copies.radii, copies.generators())]
    x_start = torch.clamp(copies.xs + torch.cat(starts), 0.0, 1.0)
    return copies.sign_steps(model, x_start, steps=steps, alpha=[2.5 * e / steps for e in copies.radii])


def linf(name: str, steps: int) -> EvasionAttack:
    """L-inf PGD with ``steps`` steps, called ``name``."""
    return EvasionAttack(
        name, partial(pgd, steps=steps), random_start=True, each_eps=partial(linf_each_eps, steps=steps)
    )


_STEPS = re.compile(r"pgd(\d+)")


def with_steps(name: str) -> EvasionAttack | None:
    """``pgd<k>`` (e.g. ``pgd20``): L-inf PGD with k >= 1 steps; None for any other name."""
    match = _STEPS.fullmatch(name)
    if match is None or int(match.group(1)) < 1:
        return None
    return linf(name, int(match.group(1)))


ATTACK = linf("pgd", DEFAULT_STEPS)
# one radius after the other: its start's radius and its steps' directions are not sign steps
ATTACK_L2 = EvasionAttack("pgd_l2", partial(pgd, norm="l2"), random_start=True)
STEPS_FAMILY = AttackFamily("pgd<k>", "PGD with k >= 1 steps (e.g. pgd20)", with_steps)
