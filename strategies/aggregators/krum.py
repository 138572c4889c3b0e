"""Krum.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, TooFewReplies, check_optional_count
from strategies.aggregators.ops import gram, lowest, sq_distances


def krum_scores(sq_dist: torch.Tensor, f: int) -> torch.Tensor:
    """Each client's sum of squared distances to its n - f - 2 nearest other clients (float64).

    As Flower's ``select_multikrum``, at least one neighbour is counted. The client itself is
    excluded by position, not by being the nearest: Flower skips the first entry of each sorted
    row, which is not the client itself when the float32 Gram trick on raw weights makes some
    other distance smaller than the (rounded) zero on the diagonal.
    """
    n = sq_dist.shape[0]
    k = max(1, n - f - 2)
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    off = sq_dist.clone()
    off.fill_diagonal_(float("inf"))
    return torch.topk(off, min(k, n - 1), dim=1, largest=False).values.sum(1)


@dataclass
class KrumConfig(StrategyConfig):
    name: str = "krum"
    # f, the number of malicious clients the rule guards against. None: the largest f the rule
    # allows for the replies of the round, (n - 3) // 2 (n > 2f + 2)
    num_malicious: Optional[int] = None


class Krum(Aggregator):
    """The one update with the smallest Krum score, ``num_malicious`` = f.

    Krum needs n > 2f + 2; f = None takes the largest f that allows, (n - 3) // 2. Flower's
    ``Krum`` defaults to f = 0 instead.

    Score: the Krum score (sum of squared distances to the n - f - 2 nearest others). Flagged:
    everyone but the selected client. Ties go to the smaller client id.
    """

    name = "krum"
    config = KrumConfig
    rule = "Krum needs n > 2f + 2"

    def __init__(self, num_malicious: int | None = None) -> None:
        self.num_malicious = check_optional_count("num_malicious", num_malicious, 0)

    def max_malicious(self, n: int) -> int:
        return (n - 3) // 2

    def malicious(self, n: int) -> int:
        """f for n replies: the configured one, else the largest the rule allows."""
        limit = self.max_malicious(n)
        if self.num_malicious is None:
            if limit < 0:
                raise TooFewReplies(
                    f"strategy={self.name} cannot aggregate {n} replies: {self.rule}, "
                    f"so at least {self.min_replies(0)} replies"
                )
            return limit
        f = self.num_malicious
        if f > limit:
            hint = f"at most f={limit} for {n} replies" if limit >= 0 else "no f works with so few"
            raise TooFewReplies(
                f"strategy.num_malicious={f} is too large for {n} replies: {self.rule} "
                f"({hint}; f={f} needs at least {self.min_replies(f)} replies)"
            )
        return f

    def min_replies(self, f: int) -> int:
        return 2 * f + 3

    def check_replies(self, n: int) -> None:
        self.malicious(n)

    def scores(self, updates: torch.Tensor) -> torch.Tensor:
        return krum_scores(sq_distances(gram(updates)), self.malicious(updates.shape[0]))

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        scores = self.scores(updates)
        (best,) = lowest(scores, client_ids, 1).tolist()
        flagged = [i for i in range(updates.shape[0]) if i != best]
        return Aggregate(updates[best].clone(), scores, flagged)
