"""Coordinate-wise median.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, above_expected
from strategies.aggregators.ops import Scratch, count_extremes, middle, sorted_column_blocks


@dataclass
class FedMedianConfig(StrategyConfig):
    name: str = "fedmedian"


class FedMedian(Aggregator):
    """Median of each coordinate over the clients, unweighted, as Flower's ``FedMedian``.

    Like ``np.median``, an even number of clients gives the mean of the two middle values.

    Score: the share of the client's coordinates where its value is the column's minimum or
    maximum, counted over the coordinates where the clients do not all agree (a frozen layer,
    whose update is zero for everyone, says nothing). A client that is an extreme in most
    coordinates is the one the median ignores: this is our definition of "down-weighted" for the
    coordinate-wise rules. Flagged: score above halfway between the share e = 2 / n that every
    client would have if all were alike and 1, i.e. score > 0.5 + 1/n (with 2 clients, everybody
    is an extreme everywhere, the median is their mean, and nobody is flagged).
    """

    name = "fedmedian"
    config = FedMedianConfig

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        extreme = torch.zeros(n, dtype=torch.float64, device=updates.device)
        informative = 0
        scratch = Scratch()
        for cols, s in sorted_column_blocks(updates):
            out[cols] = middle(s)
            constant = int((s[-1] == s[0]).sum())  # every client is an extreme there
            informative += s.shape[1] - constant
            extreme += count_extremes(updates[:, cols], s[0], s[-1], scratch) - constant
        scores = extreme.cpu() / max(informative, 1)
        return Aggregate(out, scores, above_expected(scores, min(2.0 / n, 1.0)))
