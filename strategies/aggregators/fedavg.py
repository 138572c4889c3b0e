"""Federated averaging.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017.
"""

from __future__ import annotations

from strategies.aggregators.base import Aggregate, Aggregator, data_weights, none_flagged
from strategies.aggregators.ops import weighted_sum


class FedAvg(Aggregator):
    """Mean of the updates weighted by example count, as Flower's ``FedAvg``.

    Scores: 0 for everyone. Flagged: nobody.
    """

    name = "fedavg"

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        scores, flagged = none_flagged(updates.shape[0])
        return Aggregate(weighted_sum(data_weights(num_examples), updates), scores, flagged)
