"""The registry of poisoning attacks and the typed reading of an ``attack`` section."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from fedmed.options import Options, section_of, typed_option
from fedmed.poisoning.base import AttackConfig, PoisoningAttack

ATTACKS: dict[str, PoisoningAttack] = Options("attack")


register = ATTACKS.register
attack_named = ATTACKS.named
store_configs = ATTACKS.store_configs  # Hydra's group ``attack``


def attack_config(section: Mapping | AttackConfig | None) -> AttackConfig:
    """The typed config of an ``attack`` section (a DictConfig, the plain dict a client gets in
    its job, or a typed config already; None reads as ``attack=none``). A key the option does
    not have, or a value of the wrong type, is refused with the key's name. Not range-checked:
    that is :func:`check_attack`."""
    if isinstance(section, AttackConfig):
        return section
    if section is None:
        section = {"name": "none"}
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    attack = attack_named(str(section.get("name", "none")))
    return typed_option("attack", attack.name, attack.config, section)


def check_attack(
    section: Mapping | AttackConfig | None, num_classes: int | None = None, num_clients: int | None = None
) -> AttackConfig:
    """Refuse an attack configuration that cannot work, naming the key and what to do; returns
    the typed config. ``num_classes`` and ``num_clients``, where known, bound the classes and
    ``attack.ids``."""
    config = attack_config(section)
    config.check(num_classes, num_clients)
    return config


def attack_section(name: str, **changes) -> dict:
    """The plain ``attack`` section of option ``name`` with its defaults and ``changes``, as a
    client's job carries it (tests and experiments build jobs with it)."""
    return section_of("attack", name, attack_named(name).config, changes)
