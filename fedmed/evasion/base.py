"""The record that registers an evasion attack, the family of names one can stand for (``pgd<k>``),
the batch of copies an attack of every radius at once works on, and the seeded attack that
:func:`fedmed.evasion.make_attack` returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedmed.evasion._common import DEFAULT_STEPS, per_sample, sign_step_attack

# attack(model, x, y, *, eps) -> x_adv; with a random start also ``generator=``
RadiusAttack = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Copies:
    """One clean batch repeated once per radius, as :func:`fedmed.evasion.attack_each_eps` hands it
    to an attack's ``each_eps``: copy ``i`` (rows ``i*n .. (i+1)*n - 1``) is attacked at
    ``radii[i]``, with its random start drawn from ``generators()[i]`` (seeded ``seeds[i]``)."""

    x: torch.Tensor  # the clean batch (n, ...), detached
    y: torch.Tensor
    radii: list[float]
    seeds: list[int]
    xs: torch.Tensor  # x repeated: (count * n, ...)
    ys: torch.Tensor
    eps: torch.Tensor  # each row's radius, (count * n, 1, ...)

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, radii: list[float], seeds: list[int]) -> Copies:
        count = len(radii)
        xs, ys = x.repeat(count, *([1] * (x.ndim - 1))), y.repeat(count)
        return cls(x, y, list(radii), list(seeds), xs, ys, _per_row(radii, x))

    @property
    def count(self) -> int:
        return len(self.radii)

    def per_sample(self, values: list[float]) -> torch.Tensor:
        """One value per radius -> one per row of ``xs``, shaped (count * n, 1, ...) to broadcast."""
        return _per_row(values, self.x)

    def sign_steps(
        self, model: nn.Module, x_start: torch.Tensor, *, steps: int, alpha: list[float], decay: float | None = None
    ) -> torch.Tensor:
        """Untargeted L-inf sign steps on every copy from ``x_start`` (shaped as ``xs``), of size
        ``alpha[i]`` in copy ``i`` and projected onto its radius (BIM, MI-FGSM with ``decay``, PGD)."""
        return sign_step_attack(
            model,
            self.xs,
            self.ys,
            x_start,
            eps=self.eps,
            steps=steps,
            alpha=self.per_sample(alpha),
            decay=decay,
            targeted=False,
            copies=self.count,
        )

    def generators(self) -> list[torch.Generator]:
        """Each copy's generator, seeded as :class:`Attack` seeds the one of a single radius."""
        return [torch.Generator(device=self.x.device).manual_seed(seed) for seed in self.seeds]


def from_clean_each_eps(model: nn.Module, copies: Copies, *, decay: float | None = None) -> torch.Tensor:
    """``each_eps`` of BIM and MI-FGSM: their default steps of ``eps / steps`` from the clean copies."""
    alpha = [e / DEFAULT_STEPS for e in copies.radii]
    return copies.sign_steps(model, copies.xs, steps=DEFAULT_STEPS, alpha=alpha, decay=decay)


def _per_row(values: list[float], x: torch.Tensor) -> torch.Tensor:
    return per_sample(torch.tensor(values, dtype=x.dtype, device=x.device).repeat_interleave(x.shape[0]), x.ndim)


@dataclass(frozen=True)
class EvasionAttack:
    """A registered evasion attack: its name in ``eval.attacks`` and how it runs.

    ``attack(model, x, y, *, eps)`` attacks one batch at radius ``eps`` (pixel scale) and returns
    the adversarial batch, following the rules of :mod:`fedmed.evasion`. ``random_start``: it
    draws a random start, and gets ``generator=`` (a ``torch.Generator`` on ``x``'s device,
    seeded by :class:`Attack`) too.

    ``each_eps(model, copies) -> xs_adv``: every radius in one batch (:class:`Copies`), in eval
    mode, each copy with its own radius (``copies.eps``), step size (``copies.per_sample``) and
    generator, so that it gets what ``attack`` gives it alone; the model's arithmetic on a larger
    batch aside. None: :func:`fedmed.evasion.attack_each_eps` runs one radius after the other.
    Plain functions (or ``functools.partial`` of them), so that the record pickles to Ray workers.
    """

    name: str
    attack: RadiusAttack
    random_start: bool = False
    each_eps: Callable[[nn.Module, Copies], torch.Tensor] | None = None


@dataclass(frozen=True)
class AttackFamily:
    """Names an attack stands for beyond its registered ones, such as ``pgd<k>``: ``resolve(name)``
    is the attack a name means, or None when it is not of this family. ``form`` and ``meaning``
    go into the message listing the known attacks (``pgd<k> for PGD with k >= 1 steps``)."""

    form: str
    meaning: str
    resolve: Callable[[str], EvasionAttack | None]


@dataclass(frozen=True)
class Attack:
    """A named, seeded attack: ``attack(model, x, y) -> x_adv``.

    Each call of an attack with a random start draws it from a fresh ``torch.Generator`` on
    ``x``'s device seeded with ``seed``, so equal inputs and seed give the same adversarial batch.
    A plain dataclass (not a closure), so that it pickles to Ray workers.
    """

    record: EvasionAttack
    eps: float
    seed: int = 0

    @property
    def name(self) -> str:
        return self.record.name

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.record.random_start:
            return self.record.attack(model, x, y, eps=self.eps)
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return self.record.attack(model, x, y, eps=self.eps, generator=generator)
