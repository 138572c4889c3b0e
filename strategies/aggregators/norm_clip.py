"""Norm-difference clipping.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963,
2019 (NeurIPS 2019 FL workshop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, check_positive, data_weights
from strategies.aggregators.ops import median, weighted_sum


@dataclass
class NormClipConfig(StrategyConfig):
    name: str = "norm_clip"
    clip_norm: Optional[float] = None  # the update-norm bound M (None: the median update norm of the round)


class NormClip(Aggregator):
    """Scale each update by min(1, M / ||u_i||), then take the mean weighted by example count.

    ``clip_norm`` M; None takes the median update norm of the round (the mean of the two middle
    norms when their number is even), which needs no tuning to the model's scale but clips about
    half of the clients every round, each of them only a little.

    Score: ||u_i|| / M. Flagged: the clipped clients (score > 1) — with the median default,
    roughly the upper half of the norms, honest ones included.
    """

    name = "norm_clip"
    config = NormClipConfig

    def __init__(self, clip_norm: float | None = None) -> None:
        self.clip_norm = check_positive("clip_norm", clip_norm, allow_none=True)

    def bound(self, norms: torch.Tensor) -> float:
        return self.clip_norm if self.clip_norm is not None else float(median(norms))

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        norms = torch.linalg.vector_norm(updates, dim=1).double().cpu()
        bound = self.bound(norms)
        if bound > 0:
            scale = torch.where(norms > bound, bound / norms.clamp_min(bound), torch.ones_like(norms))
            scores = norms / bound
        else:  # every update is zero
            scale, scores = torch.ones_like(norms), torch.zeros_like(norms)
        flagged = torch.nonzero(scale < 1).flatten().tolist()
        return Aggregate(weighted_sum(data_weights(num_examples) * scale, updates), scores, flagged)
