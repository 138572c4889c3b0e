"""Reading one option of a config group (``defense=``, ``attack=``) as its typed dataclass.

Each registry (fedmed/defenses/, fedmed/poisoning/) stores one dataclass per option in Hydra's
ConfigStore; a section reaches a client as a plain dict in its job, and these turn it back into
the typed config with the same errors Hydra gives at composition.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


def typed_option(group: str, name: str, config: type, section: Mapping):
    """``section`` merged onto option ``name``'s dataclass ``config``: a key the option does
    not have, or a value of the wrong type, is refused naming ``<group>.<key>``."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), dict(section))
    except ConfigKeyError as error:
        keys = ", ".join(f"{group}.{key}" for key in OmegaConf.structured(config))
        raise ValueError(f"{group}={name} has no key {group}.{error.full_key}; its keys are {keys}") from None
    except OmegaConfBaseException as error:
        raise ValueError(f"{group}={name}: {group}.{error.full_key}: {error.msg.splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def option_defaults(group: str, name: str, config: type, changes: dict) -> dict:
    """The plain section of option ``name`` with its defaults and ``changes``, as a client's
    job carries it (tests and experiments build jobs with it)."""
    values = OmegaConf.to_container(OmegaConf.structured(config))
    unknown = set(changes) - set(values)
    if unknown:
        raise ValueError(f"{group}={name} has no key {', '.join(sorted(unknown))}; its keys are {', '.join(values)}")
    values.update(changes)
    return values
