"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018): k-step PGD from a random start, step 2.5 eps / k."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.defenses.adversarial_training import AdversarialTrainingConfig, train_adversarially
from fedmed.defenses.base import Defense


@dataclass
class PgdAtConfig(AdversarialTrainingConfig):
    method = "pgd"

    name: str = "pgd_at"
    steps: int = 7

    def attack_steps(self) -> int:
        return self.steps


DEFENSE = Defense("pgd_at", PgdAtConfig, train_adversarially)
