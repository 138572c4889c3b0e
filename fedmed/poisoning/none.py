"""No attack: every client is honest. The option has no keys besides its name, so a setting
such as ``attack.fraction`` with ``attack=none`` is refused rather than silently ignored."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.poisoning.base import AttackConfig, PoisoningAttack


@dataclass
class NoAttackConfig(AttackConfig):
    name: str = "none"


ATTACK = PoisoningAttack("none", NoAttackConfig)
