"""The registry of evasion attacks, the seeded attack a name stands for, and every radius of one
attack in one batch."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from fedmed.evasion._common import check_eps, check_inputs, eval_mode
from fedmed.evasion.base import Attack, AttackFamily, Copies, EvasionAttack


class EvasionAttacks(dict):
    """The registered evasion attacks by name, and the families of names beyond them (``pgd<k>``).
    Their names are list items of ``eval.attacks``, not a Hydra config group."""

    def __init__(self) -> None:
        super().__init__()
        self.families: list[AttackFamily] = []

    def register(self, attack: EvasionAttack) -> EvasionAttack:
        if attack.name in self:
            raise ValueError(f"an evasion attack named {attack.name!r} is registered already")
        self[attack.name] = attack
        return attack

    def register_family(self, family: AttackFamily) -> AttackFamily:
        self.families.append(family)
        return family

    def named(self, name: str) -> EvasionAttack:
        """The attack ``name`` stands for; an unknown one is refused listing those there are."""
        if isinstance(name, str):
            if name in self:
                return self[name]
            for family in self.families:
                attack = family.resolve(name)
                if attack is not None:
                    return attack
        forms = "".join(f", and {family.form} for {family.meaning}" for family in self.families)
        raise ValueError(f"unknown attack {name!r}; known attacks: {', '.join(self)}{forms}")


ATTACKS = EvasionAttacks()


def register(attack: EvasionAttack) -> EvasionAttack:
    return ATTACKS.register(attack)


def register_family(family: AttackFamily) -> AttackFamily:
    return ATTACKS.register_family(family)


def attack_named(name: str) -> EvasionAttack:
    return ATTACKS.named(name)


def check_attack_names(names) -> None:
    """Refuse an unknown name among ``names`` (``eval.attacks``), listing the known ones."""
    for name in names:
        attack_named(name)


def make_attack(name: str, eps: float, *, seed: int = 0) -> Attack:
    """The attack called ``name`` at radius ``eps`` (pixel scale), seeded with ``seed``:
    ``attack(model, x, y) -> x_adv``, picklable.

    Built-in names: ``fgsm``; ``bim`` (10 steps); ``mifgsm`` (10 steps, decay 1); ``pgd``
    (PGD-10, L-inf, random start); ``pgd<k>`` such as ``pgd20`` (PGD-k, L-inf, random start);
    ``pgd_l2`` (PGD-10 in the L2 ball of radius ``eps``, random start). Raises ValueError for an
    unknown name or an invalid ``eps``.
    """
    attack = attack_named(name)
    eps = check_eps(eps)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return Attack(attack, eps, int(seed))


def attack_each_eps(
    name: str, eps: list[float], seeds: list[int], model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[torch.Tensor]:
    """``[make_attack(name, e, seed=s)(model, x, y) for e, s in zip(eps, seeds)]``, computed as
    one attack on a batch holding a copy of ``x`` per radius when the attack can
    (its record's ``each_eps``).

    Each copy gets the gradient, random start (its own seeded generator) and steps it gets alone,
    with ``eps`` and the step size per sample; only the model's arithmetic on a larger batch may
    round differently. The built-in L-inf attacks (``fgsm``, ``bim``, ``mifgsm``, ``pgd``,
    ``pgd<k>``) are batched; ``pgd_l2`` runs one radius after the other.
    """
    if len(eps) != len(seeds):
        raise ValueError(f"{len(eps)} epsilons and {len(seeds)} seeds")
    attacks = [make_attack(name, e, seed=s) for e, s in zip(eps, seeds)]
    each_eps = attack_named(name).each_eps
    if len(attacks) < 2 or each_eps is None:
        return [attack(model, x, y) for attack in attacks]
    check_inputs(x, y)
    x = x.detach()
    copies = Copies.of(x, y, [attack.eps for attack in attacks], [attack.seed for attack in attacks])
    with eval_mode(model):
        out = each_eps(model, copies)
    chunks = list(out.split(x.shape[0]))
    for i, e in enumerate(copies.radii):  # eps = 0 returns the clean batch itself, as each attack does alone
        if e == 0:
            chunks[i] = x.clone()
    return chunks
