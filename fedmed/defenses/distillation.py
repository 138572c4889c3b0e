"""Knowledge distillation at temperature T (Hinton et al. 2015).

``mode=defensive``: defensive distillation (Papernot et al., "Distillation as a Defense to
Adversarial Perturbations against Deep Neural Networks", S&P 2016, the seed paper's defence): a
copy of the received model is trained at temperature T (the teacher), then the model itself
learns the teacher's soft labels at T and is sent back. ``mode=federated``: the received global
model, frozen, teaches the local model on a mix of its soft labels and the true labels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from fedmed.defenses.base import Defense, DefenseConfig, LocalRound

MODES = ("defensive", "federated")


@dataclass
class DistillationConfig(DefenseConfig):
    name: str = "distillation"
    mode: str = "defensive"  # defensive | federated
    temperature: float = 20.0
    soft_weight: float = 0.5  # federated mode: weight of the teacher's soft labels

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"defense.mode={self.mode!r} is not known; use defensive or federated")
        if self.temperature <= 0:
            raise ValueError(f"defense.temperature={self.temperature} must be > 0")
        if not 0 <= self.soft_weight <= 1:
            raise ValueError(f"defense.soft_weight={self.soft_weight} must be in [0, 1]")


def distill(config: DistillationConfig, local_round: LocalRound) -> dict[str, float]:
    from fedmed.defenses.steps import SoftLabelStep, temperature_step

    teacher = copy.deepcopy(local_round.model)
    if config.mode == "defensive":
        # the teacher learns the labels only: the texture loss trains the model that is sent
        local_round.train(temperature_step(config.temperature), model=teacher, texture_loss=False)
        step = SoftLabelStep(teacher, config.temperature, soft_weight=1.0)
    else:
        step = SoftLabelStep(teacher, config.temperature, soft_weight=config.soft_weight)
    result = local_round.train(step)
    return {"train_loss": result["loss"], "train_accuracy": result["accuracy"]}


DEFENSE = Defense("distillation", DistillationConfig, distill)
