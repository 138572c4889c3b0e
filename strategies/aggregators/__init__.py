"""Robust aggregators on stacked client updates, one module per rule (see ``base`` for the contract).

A rule is one module: its structured config (a subclass of ``fedmed.config.StrategyConfig`` with
its keys and defaults) and its ``Aggregator`` subclass, which checks the values and cites its
paper. To add one: the module and its class in the registration below; ``strategy=<name>``
(Hydra's ConfigStore, ``store_configs``), the checks before Ray starts and the server's strategy
all follow. ``AGGREGATORS`` lists the rules, in the README's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedmed.options import Options, typed_option
from strategies.aggregators.base import Aggregate, Aggregator, TooFewReplies
from strategies.aggregators.bulyan import Bulyan
from strategies.aggregators.fedavg import WeightedMean
from strategies.aggregators.fedmedian import FedMedian
from strategies.aggregators.flame import Flame
from strategies.aggregators.fltrust import FLTrust
from strategies.aggregators.foolsgold import FoolsGold
from strategies.aggregators.krum import Krum
from strategies.aggregators.multikrum import MultiKrum
from strategies.aggregators.norm_clip import NormClip
from strategies.aggregators.rfa import RFA
from strategies.aggregators.trimmed_mean import TrimmedMean
from strategies.aggregators.weak_dp import WeakDP

AGGREGATORS: dict[str, type[Aggregator]] = Options("strategy")
# the rules, in the README's order
for _cls in (
    WeightedMean,
    FedMedian,
    TrimmedMean,
    Krum,
    MultiKrum,
    Bulyan,
    RFA,
    NormClip,
    WeakDP,
    Flame,
    FoolsGold,
    FLTrust,
):
    AGGREGATORS.register(_cls)


def aggregator_config(section: Mapping):
    """The typed config of a ``strategy`` section (a DictConfig or a plain dict): a key the rule
    does not have, or a value of the wrong type, is refused naming ``strategy.<key>``."""
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    rule = AGGREGATORS.named(str(section["name"]))
    return typed_option("strategy", rule.name, rule.config, section)


def aggregator_from_config(section: Mapping) -> Aggregator:
    """The rule a ``strategy`` section describes, its values checked by the rule."""
    config = aggregator_config(section)
    return AGGREGATORS.named(config.name).from_config(config)


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """The aggregator ``name`` with its parameters (``strategy.<key>`` values)."""
    return aggregator_from_config({"name": name, **params})


store_configs = AGGREGATORS.store_configs  # Hydra's group ``strategy``


__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "Aggregator",
    "TooFewReplies",
    "aggregator_config",
    "aggregator_from_config",
    "make_aggregator",
    "store_configs",
    *(c.__name__ for c in AGGREGATORS.values()),
]
