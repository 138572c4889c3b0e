"""What the registries of configurable options share (``fedmed.datasets``, ``fedmed.defenses``):
the options of a config group by name, and a section turned into its option's typed, checked
config.

Free of torch and Hydra at import: the configuration is composed and checked before either loads.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class Options(dict):
    """The registered options of the config group ``group`` (``dataset``, ``defense``), by name;
    each option is a record with a ``name``."""

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


def typed_config(group: str, name: str, config: type, section: Mapping):
    """``section`` (a DictConfig, or the plain dict a client gets in its job) merged onto the
    option's structured ``config`` and checked: a key the option does not have, or a value of
    the wrong type, is refused naming ``<group>.<key>`` and listing the option's keys."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), section)
    except OmegaConfBaseException as error:
        keys = ", ".join(f"{group}.{key}" for key in OmegaConf.structured(config))
        where = f" ({group}.{error.full_key})" if error.full_key else ""
        raise ValueError(f"{group}={name}: {error.msg.splitlines()[0]}{where}; its keys are {keys}") from None
    typed = OmegaConf.to_object(merged)
    typed.check()
    return typed


def section_of(group: str, name: str, node, changes: Mapping) -> dict:
    """The plain section of option ``name`` (its structured ``node``'s defaults) with ``changes``,
    as a client's job carries it."""
    values = OmegaConf.to_container(OmegaConf.structured(node))
    unknown = set(changes) - set(values)
    if unknown:
        raise ValueError(f"{group}={name} has no key {', '.join(sorted(unknown))}; its keys are {', '.join(values)}")
    values.update(changes)
    return values
