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


class FedAvg(Aggregator):
    """Mean of the updates weighted by example count, as Flower's ``FedAvg``.

    Scores: 0 for everyone. Flagged: nobody.
    """

    name = "fedavg"
    config = FedAvgConfig
    streamed = True

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        scores, flagged = none_flagged(updates.shape[0])
        return Aggregate(weighted_sum(data_weights(num_examples), updates), scores, flagged)
