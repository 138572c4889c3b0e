"""Evasion attacks on batches of images, in pixel space [0, 1].

Input normalisation lives inside our models (:class:`fedmed.models.MedicalClassifier`), so every
attack here perturbs raw pixels: ``eps = 8/255`` means the same for every dataset and model
(docs/architecture.md). All attacks share these rules:

- ``x`` is a float batch (N, C, H, W) in [0, 1] and ``y`` its labels (N,); with
  ``targeted=True``, ``y`` holds the *target* labels and the loss is minimised instead.
- The loss is cross entropy on the logits with mean reduction (as in torchattacks). Only the
  sign (L-inf) or the per-sample direction (L2, MI-FGSM) of its gradient is used, so the
  reduction does not change the result.
- The model runs in eval mode during the attack (BatchNorm uses its running statistics and is
  not updated) and every module's previous mode is restored afterwards, also on errors.
- Gradients are taken with respect to the input only (``torch.autograd.grad``): no parameter's
  ``.grad`` is created or changed. Attacks work under an outer ``torch.no_grad()`` too.
- The result is detached, within ``eps`` of ``x`` (L-inf, or L2 for ``pgd(norm="l2")``) and
  clamped to [0, 1]. ``eps = 0`` returns ``x`` unchanged.

:func:`make_attack` turns a name from the configuration (``eval.attacks``) into a seeded
callable ``attack(model, x, y) -> x_adv``.
"""

from __future__ import annotations

import contextlib
import numbers
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTACK_NAMES",
    "Attack",
    "bim",
    "eval_mode",
    "fgsm",
    "make_attack",
    "mifgsm",
    "pgd",
]

# Base names accepted by make_attack; "pgd<k>" (e.g. "pgd20") is PGD with k steps.
ATTACK_NAMES: tuple[str, ...] = ("fgsm", "bim", "mifgsm", "pgd", "pgd_l2")

NORMS: tuple[str, ...] = ("linf", "l2")

DEFAULT_STEPS = 10

_PGD_STEPS = re.compile(r"pgd(\d+)")


# --- helpers -------------------------------------------------------------------------------


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


def _check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a number, got {eps!r}") from None
    if not eps >= 0 or eps == float("inf"):  # also rejects NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return eps


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_alpha(alpha: float | None, default: float) -> float:
    if alpha is None:
        return default
    alpha = float(alpha)
    if not alpha > 0 or alpha == float("inf"):
        raise ValueError(f"alpha (step size) must be a finite number > 0, got {alpha!r}")
    return alpha


def _check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
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


def _input_grad(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, targeted: bool, copies: int = 1
) -> torch.Tensor:
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


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N,) -> (N, 1, 1, ...) for broadcasting over a batch with ``ndim`` dimensions."""
    return values.view(-1, *([1] * (ndim - 1)))


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return _per_sample(t.flatten(1).norm(p=2, dim=1), t.ndim)


def _project(x: torch.Tensor, x_adv: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``eps`` ball around ``x``, then clamp to [0, 1].

    Clamping after the projection keeps the bound: x is in [0, 1], so clamping only moves a
    coordinate towards x.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)  # eps: a number, or one per sample (N, 1, ...)
    else:
        # eps / 0 = inf for a zero delta; min(inf, 1) = 1 leaves it as it is.
        delta = delta * torch.clamp(eps / _l2_norms(delta), max=1.0)
    return torch.clamp(x + delta, 0.0, 1.0).detach()


def _sign_step_attack(
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
        grad = _input_grad(model, x_adv, y, targeted, copies)
        if momentum is not None:
            # g_{t+1} = mu * g_t + grad / mean|grad| (per sample). The paper divides by the L1
            # norm; the mean differs by the constant D = C*H*W for grad and momentum alike, so
            # the signs (all that is used) are the same. A zero gradient stays zero (no NaN).
            scale = grad.abs().mean(dim=tuple(range(1, grad.ndim)), keepdim=True)
            grad = grad / scale.clamp_min(torch.finfo(grad.dtype).tiny)
            grad = grad + momentum * decay
            momentum = grad
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = _project(x, x_adv, eps, "linf")
    return x_adv


def _iterative_from_clean(model, x, y, *, eps, steps, alpha, decay, targeted) -> torch.Tensor:
    """BIM and MI-FGSM: checked arguments, then sign steps from the clean image in eval mode."""
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    alpha = _check_alpha(alpha, eps / steps)
    _check_inputs(x, y)
    if eps == 0:
        return x.detach().clone()
    x = x.detach()
    with eval_mode(model):
        return _sign_step_attack(model, x, y, x, eps=eps, steps=steps, alpha=alpha, decay=decay, targeted=targeted)


# --- attacks -------------------------------------------------------------------------------


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, targeted: bool = False) -> torch.Tensor:
    """Fast Gradient Sign Method: one step ``x + eps * sign(grad)``, clamped to [0, 1].

    Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015
    (arXiv:1412.6572). Identical, bit for bit, to ``torchattacks.FGSM``.
    """
    eps = _check_eps(eps)
    _check_inputs(x, y)
    if eps == 0:
        return x.detach().clone()
    with eval_mode(model):
        grad = _input_grad(model, x, y, targeted)
    return torch.clamp(x.detach() + eps * grad.sign(), 0.0, 1.0).detach()


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
    return _iterative_from_clean(model, x, y, eps=eps, steps=steps, alpha=alpha, decay=None, targeted=targeted)


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
    return _iterative_from_clean(model, x, y, eps=eps, steps=steps, alpha=alpha, decay=decay, targeted=targeted)


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
    eps = _check_eps(eps)
    steps = _check_steps(steps)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    alpha = _check_alpha(alpha, 2.5 * eps / steps)
    _check_inputs(x, y)
    if init_delta is not None and init_delta.shape != x.shape:
        raise ValueError(f"init_delta must have the shape of x {tuple(x.shape)}, got {tuple(init_delta.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, x on {x.device}; they must match")
    if eps == 0:
        return x.detach().clone()
    x = x.detach()

    if init_delta is not None:
        x_start = _project(x, x + init_delta.detach().to(x), eps, norm)
    elif random_start:
        if norm == "linf":
            delta = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
        else:
            direction = torch.empty_like(x).normal_(generator=generator)
            radius = torch.empty(x.shape[0], device=x.device, dtype=x.dtype).uniform_(0, 1, generator=generator)
            delta = direction / _l2_norms(direction) * _per_sample(radius, x.ndim) * eps
        x_start = torch.clamp(x + delta, 0.0, 1.0)
    else:
        x_start = x

    with eval_mode(model):
        if norm == "linf":
            return _sign_step_attack(
                model, x, y, x_start, eps=eps, steps=steps, alpha=alpha, decay=None, targeted=targeted
            )
        x_adv = x_start
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y, targeted)
            direction = grad / _l2_norms(grad).clamp_min(torch.finfo(grad.dtype).tiny)
            x_adv = _project(x, x_adv.detach() + alpha * direction, eps, "l2")
        return x_adv


# --- by name -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """A named, seeded attack: ``attack(model, x, y) -> x_adv``.

    Each call draws its random start from a fresh ``torch.Generator`` on ``x``'s device seeded
    with ``seed``, so equal inputs and seed give the same adversarial batch. A plain dataclass
    (not a closure), so that it pickles to Ray workers.
    """

    name: str
    eps: float
    seed: int = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "fgsm":
            return fgsm(model, x, y, eps=self.eps)
        if self.name == "bim":
            return bim(model, x, y, eps=self.eps)
        if self.name == "mifgsm":
            return mifgsm(model, x, y, eps=self.eps)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        if self.name == "pgd_l2":
            return pgd(model, x, y, eps=self.eps, norm="l2", generator=generator)
        return pgd(model, x, y, eps=self.eps, steps=_pgd_steps(self.name), generator=generator)


def _pgd_steps(name: str) -> int:
    if name == "pgd":
        return DEFAULT_STEPS
    match = _PGD_STEPS.fullmatch(name)
    return int(match.group(1)) if match else 0


def make_attack(
    name: str, eps: float, *, seed: int = 0
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attack called ``name`` at radius ``eps`` (pixel scale), seeded with ``seed``.

    Names: ``fgsm``; ``bim`` (10 steps); ``mifgsm`` (10 steps, decay 1); ``pgd`` (PGD-10, L-inf,
    random start); ``pgd<k>`` such as ``pgd20`` (PGD-k, L-inf, random start); ``pgd_l2``
    (PGD-10 in the L2 ball of radius ``eps``, random start). Raises ValueError for an unknown name
    or an invalid ``eps``.
    """
    if not isinstance(name, str) or not (name in ATTACK_NAMES or _pgd_steps(name) >= 1):
        raise ValueError(
            f"unknown attack {name!r}; known attacks: {', '.join(ATTACK_NAMES)}, "
            f"and pgd<k> for PGD with k >= 1 steps (e.g. pgd20)"
        )
    eps = _check_eps(eps)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return Attack(name, eps, int(seed))


# --- every epsilon of one attack in one batch ----------------------------------------------------

# Attacks that take the same steps at every radius, only scaled by it: one batch can hold them all.
_BATCHABLE = ("fgsm", "bim", "mifgsm")


def attack_each_eps(
    name: str, eps: list[float], seeds: list[int], model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """``[make_attack(name, e, seed=s)(model, x, y) for e, s in zip(eps, seeds)]``, computed as
    one attack on a batch holding a copy of ``x`` per radius.

    Each copy gets the gradient, random start (its own seeded generator) and steps it gets alone,
    with ``eps`` and the step size per sample; only the model's arithmetic on a larger batch may
    round differently. L-inf attacks (``fgsm``, ``bim``, ``mifgsm``, ``pgd``, ``pgd<k>``) are
    batched; ``pgd_l2`` runs one radius after the other.
    """
    if len(eps) != len(seeds):
        raise ValueError(f"{len(eps)} epsilons and {len(seeds)} seeds")
    attacks = [make_attack(name, e, seed=s) for e, s in zip(eps, seeds)]
    steps = _pgd_steps(name)
    if len(attacks) < 2 or not (name in _BATCHABLE or steps >= 1):
        return [attack(model, x, y) for attack in attacks]
    _check_inputs(x, y)
    x = x.detach()
    k, n = len(attacks), x.shape[0]
    radii = [attack.eps for attack in attacks]
    per_sample = torch.tensor(radii, dtype=x.dtype, device=x.device).repeat_interleave(n)
    eps_t = _per_sample(per_sample, x.ndim)
    xs, ys = x.repeat(k, *([1] * (x.ndim - 1))), y.repeat(k)
    with eval_mode(model):
        if name == "fgsm":
            grad = _input_grad(model, xs, ys, False, copies=k)
            out = torch.clamp(xs + eps_t * grad.sign(), 0.0, 1.0).detach()
        elif name in ("bim", "mifgsm"):
            alpha = _per_sample(
                torch.tensor([e / DEFAULT_STEPS for e in radii], dtype=x.dtype, device=x.device).repeat_interleave(n),
                x.ndim,
            )
            out = _sign_step_attack(
                model,
                xs,
                ys,
                xs,
                eps=eps_t,
                steps=DEFAULT_STEPS,
                alpha=alpha,
                decay=1.0 if name == "mifgsm" else None,
                targeted=False,
                copies=k,
            )
        else:  # pgd: each copy's random start from its own generator, as pgd() draws it
            starts = [
                torch.empty_like(x).uniform_(-e, e, generator=torch.Generator(device=x.device).manual_seed(a.seed))
                for e, a in zip(radii, attacks)
            ]
            x_start = torch.clamp(xs + torch.cat(starts), 0.0, 1.0)
            alpha = _per_sample(
                torch.tensor([2.5 * e / steps for e in radii], dtype=x.dtype, device=x.device).repeat_interleave(n),
                x.ndim,
            )
            out = _sign_step_attack(
                model, xs, ys, x_start, eps=eps_t, steps=steps, alpha=alpha, decay=None, targeted=False, copies=k
            )
    chunks = list(out.split(n))
    for i, e in enumerate(radii):  # eps = 0 returns the clean batch itself, as each attack does alone
        if e == 0:
            chunks[i] = x.clone()
    return chunks
