"""The datasets fedmed trains on: one module per family, one registry.

A dataset option is a ``Dataset`` (``base.py``): its config name, its structured config (a
dataclass, stored in Hydra's ConfigStore under the group ``dataset``, with its own ``check``), its
loader, and the ``client.*`` defaults it implies. To add one: a module in this package that
defines its ``DATASETS``, and its line in the registration at the end of this file. Nothing else
changes: ``dataset=<name>`` then composes it, a key it does not have is a Hydra error naming the
key, its check runs before any process starts and again in every client, and servers and clients
load it through ``fedmed.data``.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedmed import options
from fedmed.datasets.base import Dataset, DatasetConfig
from fedmed.options import Options, section_of

DATASETS: dict[str, Dataset] = Options("dataset")


register = DATASETS.register
dataset_named = DATASETS.named


def dataset_config(section: Mapping | DatasetConfig) -> DatasetConfig:
    """The typed, checked config of a ``dataset`` section (a DictConfig, the plain dict a client
    gets in its job, or a typed config already): keys the option does not have and values of the
    wrong type are refused with the key's name."""
    return DATASETS.checked_config(section, DatasetConfig, node=Dataset.node)


def check_dataset(section: Mapping) -> None:
    """Refuse a dataset configuration that cannot work, naming the key and what to do."""
    dataset_config(section)


def dataset_section(name: str, **changes) -> dict:
    """The plain ``dataset`` section of option ``name`` with its defaults and ``changes``, as a
    client's job carries it (tests and experiments build jobs with it)."""
    return section_of("dataset", name, dataset_named(name).node(), changes)


def own_keys(section: Mapping) -> dict:
    """``section`` (plain) with only the keys its option has. A run folder written before each
    dataset had its own keys holds the union of all of them, which the loaders ignored; dropping
    them resumes such a run unchanged (``fedmed.checkpoint.resumed_config``)."""
    return options.own_keys(dataset_named(str(section["name"])).node(), section)


def store_configs(config_store) -> None:
    """Every dataset's config as an option of Hydra's group ``dataset``. An option with
    ``client`` defaults is stored in the global package (what ``# @package _global_`` does in a
    yaml file), as a node holding both its ``dataset`` and its ``client`` keys; Hydra applies
    command-line overrides after the defaults, so an explicit ``client.*`` still wins."""
    for dataset in DATASETS.values():
        if dataset.client:
            node = {"dataset": dataset.node(), "client": dict(dataset.client)}
            config_store.store(group="dataset", name=dataset.name, node=node, package="_global_")
        else:
            config_store.store(group="dataset", name=dataset.name, node=dataset.node())


# the datasets, in the order the README lists them
from fedmed.datasets import imagefolder, medmnist, synthetic  # noqa: E402

for _module in (synthetic, medmnist, imagefolder):
    for _dataset in _module.DATASETS:
        register(_dataset)

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetConfig",
    "check_dataset",
    "dataset_config",
    "dataset_named",
    "dataset_section",
    "own_keys",
    "register",
    "store_configs",
]
