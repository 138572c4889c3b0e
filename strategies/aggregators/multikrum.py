"""Multi-Krum.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018 (Multi-Krum was introduced by Blanchard et al., NeurIPS 2017).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, TooFewReplies, check_optional_count
from strategies.aggregators.krum import Krum
from strategies.aggregators.ops import lowest, weighted_sum


@dataclass
class MultiKrumConfig(StrategyConfig):
    name: str = "multikrum"
    # f, as Krum's (None: the largest f with n > 2f + 2)
    num_malicious: Optional[int] = None
    num_to_keep: Optional[int] = None  # how many lowest-score updates are averaged (None: n - f)


class MultiKrum(Krum):
    """Keep the m = ``num_to_keep`` updates with the lowest Krum scores, average them weighted by
    example count (as Flower's ``MultiKrum``, which averages its selection with
    ``aggregate_arrayrecords``).

    ``num_malicious`` f as Krum (None: (n - 3) // 2, Krum's bound n > 2f + 2); ``num_to_keep``
    None: m = n - f, as El Mhamdi et al. (Flower's default is m = 1, plain Krum).

    Score: the Krum score. Flagged: the clients not kept. Ties go to the smaller client id.
    """

    name = "multikrum"
    config = MultiKrumConfig

    def __init__(self, num_malicious: int | None = None, num_to_keep: int | None = None) -> None:
        super().__init__(num_malicious)
        self.num_to_keep = check_optional_count("num_to_keep", num_to_keep, 1)

    def keep(self, n: int) -> int:
        f = self.malicious(n)
        m = self.num_to_keep if self.num_to_keep is not None else n - f
        if m > n:
            raise TooFewReplies(f"strategy.num_to_keep={m} is more than the {n} replies")
        return m

    def check_replies(self, n: int) -> None:
        self.keep(n)

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n = updates.shape[0]
        m = self.keep(n)
        scores = self.scores(updates)
        kept = sorted(lowest(scores, client_ids, m).tolist())
        weights = num_examples.new_zeros(n)
        weights[kept] = num_examples[kept] / num_examples[kept].sum()
        flagged = sorted(set(range(n)) - set(kept))
        return Aggregate(weighted_sum(weights, updates), scores, flagged)
