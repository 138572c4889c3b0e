"""Federated averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmed.config import StrategyConfig
from strategies.aggregators.base import Aggregate, Aggregator, data_weights, none_flagged
from strategies.aggregators.ops import weighted_sum


@dataclass
class FedAvgConfig(StrategyConfig):
    name: str = "fedavg"


class WeightedMean(Aggregator):
    """``strategy=fedavg``'s rule: the mean of the updates weighted by example count, as Flower's
    ``FedAvg`` (the one class of that name in the project; ``FedMedStrategy`` derives from it and
    sums this mean one reply at a time, ``streamed``).

    Scores: 0 for everyone. Flagged: nobody.
    """

    name = "fedavg"
    config = FedAvgConfig
    streamed = True

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        scores, flagged = none_flagged(updates.shape[0])
        return Aggregate(weighted_sum(data_weights(num_examples), updates), scores, flagged)
