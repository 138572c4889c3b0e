"""FGSM adversarial training (Goodfellow et al., "Explaining and Harnessing Adversarial
Examples", ICLR 2015): half clean, half FGSM loss by default."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.defenses.adversarial_training import AdversarialTrainingConfig, train_adversarially
from fedmed.defenses.base import Defense


@dataclass
class FgsmAtConfig(AdversarialTrainingConfig):
    method = "fgsm"

    name: str = "fgsm_at"
    clean_weight: float = 0.5


DEFENSE = Defense("fgsm_at", FgsmAtConfig, train_adversarially)
