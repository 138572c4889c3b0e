"""What the registries of configurable options share (``fedmed.datasets``, ``fedmed.defenses``,
``fedmed.poisoning``): the options of a config group by name, and a section turned into its
option's typed config.

Each registry stores one dataclass per option in Hydra's ConfigStore; a section reaches a client
as a plain dict in its job, and these turn it back into the typed config with errors that name
the key. Free of torch and Hydra at import: the configuration is composed and checked before
either loads.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class Options(dict):
    """The registered options of the config group ``group`` (``dataset``, ``defense``,
    ``attack``), by name; each option is a record with a ``name``."""

    def __init__(self, group: str) -> None:
        super().__init__()
        self.group = group

    def register(self, option):
        if option.name in self:
            raise ValueError(f"a {self.group} option named {option.name!r} is registered already")
        self[option.name] = option
        return option

    def named(self, name: str):
        """The option ``name``; an unknown one is refused listing those there are."""
        if name not in self:
            raise ValueError(f"{self.group}={name!r} is not known; use one of {', '.join(self)}")
        return self[name]

    def checked_config(self, section, base: type, node=lambda option: option.config):
        """The typed, checked config of a section of this group: a DictConfig, the plain dict a
        client gets in its job, or a typed config (a ``base`` instance) already. Keys the option
        does not have and values of the wrong type are refused with the key's name; ``node``
        gives an option's structured config."""
        if isinstance(section, base):
            section.check()
            return section
        option = self.named(str(section["name"]))
        return typed_config(self.group, option.name, node(option), section)

    def store_configs(self, config_store) -> None:
        """Every option's structured ``config`` as an option of Hydra's group ``group``."""
        for option in self.values():
            config_store.store(group=self.group, name=option.name, node=option.config)


def typed_option(group: str, name: str, config: type, section: Mapping):
    """``section`` (a DictConfig, or the plain dict a client gets in its job) merged onto the
    option's structured ``config``, unchecked: a key the option does not have, or a value of the
    wrong type, is refused naming ``<group>.<key>`` and listing the option's keys."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), section)
    except OmegaConfBaseException as error:
        keys = ", ".join(f"{group}.{key}" for key in OmegaConf.structured(config))
        if isinstance(error, ConfigKeyError):
            raise ValueError(f"{group}={name} has no key {group}.{error.full_key}; its keys are {keys}") from None
        where = f" ({group}.{error.full_key})" if error.full_key else ""
        raise ValueError(f"{group}={name}: {error.msg.splitlines()[0]}{where}; its keys are {keys}") from None
    return OmegaConf.to_object(merged)


def typed_config(group: str, name: str, config: type, section: Mapping):
    """:func:`typed_option`, then the option's ``check()``."""
    typed = typed_option(group, name, config, section)
    typed.check()
    return typed


def own_keys(node, section: Mapping) -> dict:
    """``section`` (plain) with only the keys of its option's structured ``node``. A run folder
    written before each option had its own keys holds the union of every option's keys, which the
    option ignored; dropping them resumes such a run unchanged (``fedmed.checkpoint``)."""
    keys = set(OmegaConf.structured(node))
    plain = OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)
    return {key: value for key, value in plain.items() if key in keys}


def section_of(group: str, name: str, node, changes: Mapping) -> dict:
    """The plain section of option ``name`` (its structured ``node``'s defaults) with ``changes``,
    as a client's job carries it."""
    values = OmegaConf.to_container(OmegaConf.structured(node))
    unknown = set(changes) - set(values)
    if unknown:
        raise ValueError(f"{group}={name} has no key {', '.join(sorted(unknown))}; its keys are {', '.join(values)}")
    values.update(changes)
    return values
