"""Fast adversarial training ("Fast is better than free", Wong, Rice & Kolter, ICLR 2020): FGSM
from a uniform random start in the eps ball, step 1.25 eps, adversarial loss only."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.defenses.adversarial_training import AdversarialTrainingConfig, train_adversarially
from fedmed.defenses.base import Defense


@dataclass
class FastAtConfig(AdversarialTrainingConfig):
    method = "fast"

    name: str = "fast_at"


DEFENSE = Defense("fast_at", FastAtConfig, train_adversarially)
