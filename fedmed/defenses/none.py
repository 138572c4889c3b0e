"""No defence: honest clients, plain local training (cross entropy)."""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.defenses.base import Defense, DefenseConfig, LocalRound


@dataclass
class NoDefenseConfig(DefenseConfig):
    name: str = "none"


def train_plainly(config: NoDefenseConfig, local_round: LocalRound) -> dict[str, float]:
    result = local_round.train()
    return {"train_loss": result["loss"], "train_accuracy": result["accuracy"]}


DEFENSE = Defense("none", NoDefenseConfig, train_plainly)
