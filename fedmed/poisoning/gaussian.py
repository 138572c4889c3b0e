"""Gaussian noise, an untargeted Byzantine baseline (Blanchard et al., NeurIPS 2017; Fang et al.,
USENIX Security 2020): the attacker trains honestly (so that its BatchNorm statistics and
reported metrics look like anyone's) and sends global + scale * N(0, noise_std^2) per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedmed.poisoning.base import MaliciousClientsConfig, PoisoningAttack
from fedmed.seeds import Stream, seed_for

if TYPE_CHECKING:
    import torch


@dataclass
class GaussianConfig(MaliciousClientsConfig):
    name: str = "gaussian"
    noise_std: float = 1.0  # per-coordinate standard deviation of the sent update

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        super().check(num_classes, num_clients)
        if not float(self.noise_std) > 0:
            raise ValueError(f"attack.noise_std={self.noise_std} must be > 0")


def update(
    config: GaussianConfig, trained: list[torch.Tensor], reference: list[torch.Tensor], *, seed: int, scale: float
) -> list[torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(seed_for(seed, Stream.GAUSSIAN_UPDATE))
    std = float(config.noise_std) * scale
    return [torch.randn(r.shape, generator=generator, dtype=torch.float32) * std for r in reference]


ATTACK = PoisoningAttack("gaussian", GaussianConfig, update=update)
