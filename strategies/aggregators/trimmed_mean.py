"""Coordinate-wise trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, above_expected
from strategies.aggregators.ops import Scratch, count_outside, sorted_column_blocks


@dataclass
class TrimmedMeanConfig(StrategyConfig):
    name: str = "trimmed_mean"
    beta: float = 0.2  # share trimmed from each end of every coordinate, in [0, 0.5) (Flower's default)


class TrimmedMean(Aggregator):
    """In each coordinate, drop the ``int(beta * n)`` smallest and largest values and average the
    rest, unweighted, as Flower's ``FedTrimmedAvg`` (``beta``, Flower's default 0.2, in [0, 0.5)).

    Score: the share of the client's coordinates that were trimmed, counted over the coordinates
    where the clients do not all agree; a value equal to the kept extreme counts as kept, so ties
    do not depend on the order of the clients. Flagged: score above halfway between the share
    e = 2 int(beta n) / n every client would have if all were alike and 1 (score > 0.68 with 11
    clients and beta 0.2); a fixed 0.5 would flag everybody once beta >= 0.25.
    """

    name = "trimmed_mean"
    config = TrimmedMeanConfig

    def __init__(self, beta: float = 0.2) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5:
            raise ValueError(f"strategy.beta={beta!r} must be in [0, 0.5): the share trimmed from each end")
        self.beta = float(beta)

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        cut = int(self.beta * n)
        out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        trimmed = torch.zeros(n, dtype=torch.float64, device=updates.device)
        informative = 0
        scratch = Scratch()
        for cols, s in sorted_column_blocks(updates):
            out[cols] = s[cut : n - cut].mean(0)
            if cut:
                informative += int((s[-1] > s[0]).sum())
                trimmed += count_outside(updates[:, cols], s[cut], s[n - cut - 1], scratch)
        scores = trimmed.cpu() / max(informative, 1)
        return Aggregate(out, scores, above_expected(scores, 2 * cut / n))
