"""Weak differential privacy: norm clipping, then Gaussian noise on the aggregate.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963,
2019 (NeurIPS 2019 FL workshop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, check_positive
from strategies.aggregators.norm_clip import NormClip
from strategies.aggregators.ops import noise_like


@dataclass
class WeakDPConfig(StrategyConfig):
    name: str = "weak_dp"
    clip_norm: Optional[float] = None  # the update-norm bound M (None: the median update norm of the round)
    noise_std: float = 0.002  # standard deviation of the Gaussian noise added to each coordinate


class WeakDP(NormClip):
    """``NormClip`` (``clip_norm`` M, None: the round's median update norm), then Gaussian noise of
    fixed standard deviation ``noise_std`` per coordinate (default 0.002) added to the aggregate,
    drawn from the round's generator (``Aggregate.noise``: the server adds it to the learned
    weights, not to BatchNorm's running statistics). "Weak": the noise is far below what a formal (epsilon,
    delta) guarantee would need; it is there to wash out a backdoor, as in the paper.

    Score and flagged as ``NormClip``.
    """

    name = "weak_dp"
    config = WeakDPConfig

    def __init__(self, clip_norm: float | None = None, noise_std: float = 0.002) -> None:
        super().__init__(clip_norm)
        self.noise_std = check_positive("noise_std", noise_std, allow_zero=True)

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        result = super()._aggregate(
            updates, num_examples, client_ids=client_ids, generator=generator, reference=reference
        )
        if self.noise_std > 0:
            result.noise = noise_like(updates.shape[1], self.noise_std, generator, updates.device)
        return result
