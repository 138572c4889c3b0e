"""What every dataset option shares: the base of its structured config and the record that
registers it.

Kept free of torch at import: ``fedmed-sim`` composes and checks its configuration, the dataset
section included, before it imports torch. A loader imports what it needs inside ``load``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

if TYPE_CHECKING:
    from fedmed.dataset import ArrayDataset


@dataclass
class DatasetConfig:
    """Base of every dataset option's structured config; ``dataset=<name>`` picks the option.

    Fields hold scalars (str, int, float, bool, None): loaded datasets are cached per process
    keyed by their values (``fedmed.data``).
    """

    name: str = MISSING

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key (``dataset.<key>``) and what to do."""


@dataclass(frozen=True)
class Dataset:
    """A registered dataset option.

    name : the ``dataset=`` option, and ``dataset.name``.
    config : its structured config (a ``DatasetConfig``); options of one family share it.
    load : ``load(config, seed)`` returns the ``ArrayDataset``; ``seed`` fixes whatever it draws
        (generated images, an image folder's split).
    client : ``client.*`` defaults that choosing this option also sets; an explicit ``client.*``
        override still wins.
    """

    name: str
    config: type[DatasetConfig]
    load: Callable[[Any, int], ArrayDataset]
    client: Mapping[str, Any] = field(default_factory=dict)

    def node(self) -> DatasetConfig:
        """The option's config with its defaults, as ``dataset=<name>`` composes it."""
        return self.config(name=self.name)


def refuse(key: str, value: Any, what: str) -> ValueError:
    """The error for a ``dataset.<key>`` setting that cannot work; ``what`` says what to do."""
    return ValueError(f"dataset.{key}={value!r} {what}")


def check_at_least(config: DatasetConfig, keys: tuple[str, ...], minimum: int, what: str = "") -> None:
    for key in keys:
        value = getattr(config, key)
        if value < minimum:
            raise refuse(key, value, f"must be >= {minimum}{what}")


def check_channels(config: DatasetConfig) -> None:
    if config.channels not in (1, 3):
        raise refuse("channels", config.channels, "must be 1 (grey) or 3 (RGB)")
