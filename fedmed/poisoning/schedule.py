"""Who attacks, in which rounds, and by how much the malicious update is scaled.

The server's ground truth (detection scoring) and each client's own decision both come from
here, with the run's seed and ``federation.num_clients``. Malicious clients behave honestly
before ``attack.start_round`` and between attack rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmed.poisoning.base import AttackConfig, DataPoisoningConfig, MaliciousClientsConfig
from fedmed.poisoning.registry import attack_config
from fedmed.seeds import Stream, seed_for

AttackSection = Mapping | AttackConfig | None


def malicious_partitions(num_clients: int, fraction: float, ids: list[int] | None, seed: int) -> list[int]:
    """The malicious partition ids, sorted.

    Explicit ``ids`` win (an empty list counts as unset); else a seeded sample of
    ``round(fraction * num_clients)`` partitions (half rounds up), at least one when
    ``fraction > 0``.
    """
    if ids:
        return sorted({int(i) for i in ids})
    if fraction <= 0 or num_clients < 1:
        return []
    count = min(num_clients, max(1, int(math.floor(fraction * num_clients + 0.5))))
    rng = np.random.default_rng(seed_for(seed, Stream.MALICIOUS_CLIENTS))
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def malicious_ids(attack: AttackSection, num_clients: int, seed: int) -> list[int]:
    """:func:`malicious_partitions` for an ``attack`` section; ``[]`` for ``attack=none``."""
    config = attack_config(attack)
    if not isinstance(config, MaliciousClientsConfig):
        return []
    return malicious_partitions(num_clients, float(config.fraction), config.ids, seed)


def attacks_in_round(attack: AttackSection, server_round: int) -> bool:
    """Whether malicious clients attack in ``server_round``: from ``start_round`` on, every
    ``frequency`` rounds. Before and between, they train honestly on their clean share."""
    config = attack_config(attack)
    if not isinstance(config, MaliciousClientsConfig) or server_round < int(config.start_round):
        return False
    return (server_round - int(config.start_round)) % int(config.frequency) == 0


def attacks_now(attack: AttackSection, partition_id: int, num_clients: int, seed: int, server_round: int) -> bool:
    """Whether partition ``partition_id`` attacks in ``server_round``."""
    return attacks_in_round(attack, server_round) and partition_id in malicious_ids(attack, num_clients, seed)


def update_scale(
    attack: AttackSection,
    *,
    num_train: int,
    num_clients: int,
    clients_per_round: int,
    attacker_examples: int,
    num_malicious: int = 1,
) -> float:
    """The factor the malicious update (local - global) is multiplied by before it is sent.

    ``attack.scale`` when set; else 1, except in ``replacement`` mode: the examples of a
    round's clients over the attackers' (Bagdasaryan et al. 2020, gamma = n / eta with FedAvg's
    example weights). The round's examples are estimated as ``clients_per_round * num_train /
    num_clients``; the attackers' as ``attacker_examples`` times the attackers expected in a
    round (``num_malicious * clients_per_round / num_clients``, at least one). The attackers
    collude and share the replacement: with two of them each scaled to replace the average
    alone, FedAvg would move twice as far and overshoot the attacker's model. With equal
    partitions and one attacker per round the factor is about ``clients_per_round``.
    """
    config = attack_config(attack)
    if not isinstance(config, MaliciousClientsConfig):
        return 1.0
    if config.scale is not None:
        return float(config.scale)
    if not isinstance(config, DataPoisoningConfig) or config.mode != "replacement":
        return 1.0
    total = clients_per_round * num_train / max(num_clients, 1)
    attackers_per_round = max(1.0, num_malicious * clients_per_round / max(num_clients, 1))
    return float(total / (max(attacker_examples, 1) * attackers_per_round))
