"""Sign flipping, an untargeted Byzantine baseline (Blanchard et al., NeurIPS 2017; Fang et al.,
USENIX Security 2020): the attacker trains honestly and sends global - scale * (local - global).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmed.poisoning.base import MaliciousClientsConfig, PoisoningAttack

if TYPE_CHECKING:
    import torch


@dataclass
class SignFlipConfig(MaliciousClientsConfig):
    name: str = "sign_flip"


def update(
    config: SignFlipConfig, trained: list[torch.Tensor], reference: list[torch.Tensor], *, seed: int, scale: float
) -> list[torch.Tensor]:
    return [(r - t) * scale for t, r in zip(trained, reference)]


ATTACK = PoisoningAttack("sign_flip", SignFlipConfig, update=update)
