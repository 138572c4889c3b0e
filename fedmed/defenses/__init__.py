"""Client defences against evasion attacks and for privacy: one module per defence, one registry.

A defence is a ``Defense`` (``base.py``): its config name, its structured config (a dataclass,
stored in Hydra's ConfigStore under the group ``defense``, with its own ``check``) and its round
of training. To add one: a module in this package that defines the three as its ``DEFENSE``,
and its line in the registration at the end of this file. Nothing else changes: ``defense=<name>`` then composes
it, a key it does not have is a Hydra error naming the key, its check runs before any process
starts and again in every client, and clients train with it.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedmed.defenses.base import Defense, DefenseConfig, LocalData, LocalRound
from fedmed.options import Options, section_of

DEFENSES: dict[str, Defense] = Options("defense")


register = DEFENSES.register
defense_named = DEFENSES.named
store_configs = DEFENSES.store_configs  # Hydra's group ``defense``


def defense_config(section: Mapping | DefenseConfig) -> DefenseConfig:
    """The typed, checked config of a ``defense`` section (a DictConfig, the plain dict a client
    gets in its job, or a typed config already): keys the option does not have and values of the
    wrong type are refused with the key's name."""
    return DEFENSES.checked_config(section, DefenseConfig)


def check_defense(section: Mapping) -> None:
    """Refuse a defence configuration that cannot work, naming the key and what to do."""
    defense_config(section)


def defense_section(name: str, **changes) -> dict:
    """The plain ``defense`` section of option ``name`` with its defaults and ``changes``, as a
    client's job carries it (tests and experiments build jobs with it)."""
    return section_of("defense", name, defense_named(name).config, changes)


def model_norm_for(norm: str, defense_name: str) -> str:
    """Per-example gradients (DP-SGD) are undefined under BatchNorm, which mixes examples: under
    such a defence every model, clients' and server's alike, gets GroupNorm."""
    if norm == "batch" and defense_named(defense_name).per_example_gradients:
        return "group"
    return norm


# the defences, in the order the README lists them
from fedmed.defenses import distillation, dp_sgd, fast_at, fgsm_at, none, pgd_at  # noqa: E402

for _module in (none, fgsm_at, fast_at, pgd_at, distillation, dp_sgd):
    register(_module.DEFENSE)

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseConfig",
    "LocalData",
    "LocalRound",
    "check_defense",
    "defense_config",
    "defense_named",
    "defense_section",
    "model_norm_for",
    "register",
    "store_configs",
]
