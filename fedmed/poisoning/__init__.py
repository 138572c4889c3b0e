"""Poisoning attacks by malicious clients: one module per attack, one registry.

An attack is a ``PoisoningAttack`` (``base.py``): its config name, its structured config (a
dataclass stored in Hydra's ConfigStore under the group ``attack``, with its own ``check``), and
what it does: a data-poisoning attack returns the poison for the attacker's training pool
(``poison``), a model-poisoning attack the update it sends instead of the trained one
(``update``); a targeted attack also builds the server's backdoor test set. To add one: a module
in this package defining them as its ``ATTACK``, and its line in the registration at the end of
this file. ``attack=<name>`` then composes it, a key it does not have is a Hydra error naming
the key, its check runs before any process starts and again in every client, and malicious
clients (clients/malicious.py) carry it out.

Pure data and configuration logic, no Flower, and no torch at import.

Malicious clients behave honestly before ``attack.start_round`` and between attack rounds
(``schedule.py``), so that attacks hit a model that has learned, as in the literature.
"""

from __future__ import annotations

# the attacks, in the order the README lists them
from fedmed.poisoning import badnets, edge_case, gaussian, label_flip, none, sign_flip  # noqa: E402, I001
from fedmed.poisoning.backdoor import BackdoorTestSet, backdoor_asr, backdoor_test_set, held_out_indices
from fedmed.poisoning.base import (
    ATTACK_MODES,
    AttackConfig,
    DataPoisoningConfig,
    MaliciousClientsConfig,
    Poison,
    PoisoningAttack,
)
from fedmed.poisoning.registry import (
    ATTACKS,
    attack_config,
    attack_named,
    attack_section,
    check_attack,
    register,
    store_configs,
)
from fedmed.poisoning.schedule import attacks_in_round, attacks_now, malicious_ids, malicious_partitions, update_scale

for _module in (none, edge_case, badnets, label_flip, sign_flip, gaussian):
    register(_module.ATTACK)

__all__ = [
    "ATTACKS",
    "ATTACK_MODES",
    "AttackConfig",
    "BackdoorTestSet",
    "DataPoisoningConfig",
    "MaliciousClientsConfig",
    "Poison",
    "PoisoningAttack",
    "attack_config",
    "attack_named",
    "attack_section",
    "attacks_in_round",
    "attacks_now",
    "backdoor_asr",
    "backdoor_test_set",
    "check_attack",
    "held_out_indices",
    "malicious_ids",
    "malicious_partitions",
    "register",
    "store_configs",
    "update_scale",
]
