"""What the evasion attacks share: checked arguments, eval mode, the gradient with respect to the
input, projection onto the eps ball, and the loop of L-inf sign steps (BIM, MI-FGSM, PGD)."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_STEPS = 10


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode; restore each one's own mode on exit.

    Restoring module by module (not ``model.train(was_training)``) keeps mixed states intact,
    e.g. a training model whose frozen backbone BatchNorms are deliberately in eval mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if not eps >= 0 or eps == float("inf"):  # also rejects NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return eps


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def check_alpha(alpha: float | None, default: float) -> float:
    if alpha is None:
        return default
    alpha = float(alpha)
    if not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"alpha (step size) must be a finite number > 0, got {alpha!r}")
    return alpha


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"x must be a float tensor of pixels in [0, 1], got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    if x.ndim < 2 or not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
        raise ValueError(
            f"x must be a batch (N, ...) and y its N labels; got x {tuple(x.shape)} and "
            f"y {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if x.numel():
        low, high = (float(v) for v in torch.aminmax(x.detach()))
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"x must hold pixels in [0, 1] (normalisation is inside the model), got values "
                f"in [{low:.4g}, {high:.4g}]"
            )


def input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, targeted: bool, copies: int = 1) -> torch.Tensor:
    """Gradient of the attack objective with respect to ``x_adv`` only.

    Untargeted: cross entropy with the true labels (to be increased). Targeted: minus the cross
    entropy with the target labels, so that ascending it moves towards the target. ``copies``:
    the batch holds that many attacks of one batch of images (``attack_each_eps``); the loss is
    the sum divided by one copy's size, so each copy gets the gradient it gets alone.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        if copies == 1:
            loss = F.cross_entropy(model(x_adv), y)
        else:
            loss = F.cross_entropy(model(x_adv), y, reduction="sum") / (y.shape[0] // copies)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, x_adv)
    return grad


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) for broadcasting over a batch with ``ndim`` dimensions."""
    return values.view(-1, *([1] * (ndim - 1)))


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    return per_sample(t.flatten(1).norm(p=2, dim=1), t.ndim)


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``eps`` ball around ``x``, then clamp to [0, 1].

    Clamping after the projection keeps the bound: x is in [0, 1], so clamping only moves a
    coordinate towards x.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)  # eps: a number, or one per sample (N, 1, ...)
    else:
        # eps / 0 = inf for a zero delta; min(inf, 1) = 1 leaves it as it is.
        delta = delta * torch.clamp(eps / l2_norms(delta), max=1.0)
    return torch.clamp(x + delta, 0.0, 1.0).detach()


def sign_step_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_start: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    steps: int,
    alpha: float | torch.Tensor,
    decay: float | None,
    targeted: bool,
    copies: int = 1,
) -> torch.Tensor:
    """Iterated L-inf sign steps from ``x_start`` with projection (BIM / PGD), with momentum
    on the L1-normalised gradient when ``decay`` is given (MI-FGSM). ``eps`` and ``alpha`` are
    numbers or per-sample tensors (N, 1, ...) (``attack_each_eps``)."""
    x_adv = x_start
    momentum = torch.zeros_like(x) if decay is not None else None
    for _ in range(steps):
        grad = input_grad(model, x_adv, y, targeted, copies)
        if momentum is not None:
            # g_{t+1} = mu * g_t + grad / mean|grad| (per sample). The paper divides by the L1
            # norm; the mean differs by the constant D = C*H*W for grad and momentum alike, so
            # the signs (all that is used) are the same. A zero gradient stays zero (no NaN).
            scale = grad.abs().mean(dim=tuple(range(1, grad.ndim)), keepdim=True)
            grad = grad / scale.clamp_min(torch.finfo(grad.dtype).tiny)
            grad = grad + momentum * decay
            momentum = grad
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = project(x, x_adv, eps, "linf")
    return x_adv


def iterative_from_clean(model, x, y, *, eps, steps, alpha, decay, targeted) -> torch.Tensor:
    """BIM and MI-FGSM: checked arguments, then sign steps from the clean image in eval mode."""
    eps = check_eps(eps)
    steps = check_steps(steps)
    alpha = check_alpha(alpha, eps / steps)
    check_inputs(x, y)
    if eps == 0:
        return x.detach().clone()
    x = x.detach()
    with eval_mode(model):
        return sign_step_attack(model, x, y, x, eps=eps, steps=steps, alpha=alpha, decay=decay, targeted=targeted)
