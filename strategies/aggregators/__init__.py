"""Robust aggregators on stacked client updates, one module per rule (see ``base`` for the contract).

``make_aggregator(name, **params)`` builds one from the ``strategy`` configuration section
(fedmed/config.py, ``StrategyConfig``); ``AGGREGATORS`` lists the names, as the README's configuration table.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

from strategies.aggregators.base import Aggregate, Aggregator, TooFewReplies
from strategies.aggregators.bulyan import Bulyan
from strategies.aggregators.fedavg import FedAvg
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

_CLASSES: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        FedAvg,
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
    )
}
AGGREGATORS: tuple[str, ...] = tuple(_CLASSES)

# strategy keys used by the server rather than by an aggregator
_SERVER_KEYS = ("root_samples", "root_iterations")


def make_aggregator(name: str, **params: Any) -> Aggregator:
    """The aggregator ``name`` with its parameters.

    ``params`` may be the whole ``strategy`` section without ``name``: a key the rule does not
    take is dropped when it holds ``StrategyConfig``'s default, and refused otherwise (setting
    ``strategy.num_malicious`` for ``fedmedian`` would silently do nothing). Keys that are not
    ``StrategyConfig`` fields at all are refused, unless the rule takes them (e.g. ``nu`` for rfa).
    """
    from fedmed.config import StrategyConfig

    if name not in _CLASSES:
        raise ValueError(f"strategy={name!r} is not known; use one of {', '.join(AGGREGATORS)}")
    cls = _CLASSES[name]
    defaults = {f.name: f.default for f in fields(StrategyConfig)}
    taken = set(cls.params)
    extra_ok = set(inspect.signature(cls).parameters) - taken
    kwargs = {}
    for key, value in params.items():
        if key == "name":
            continue
        if key in taken or (key in extra_ok and key not in defaults):
            kwargs[key] = value
        elif key in defaults:
            if key not in _SERVER_KEYS and value != defaults[key]:
                uses = ", ".join(f"strategy.{p}" for p in cls.params) or "none"
                raise ValueError(
                    f"strategy.{key}={value!r} has no effect with strategy={name} (its parameters: {uses})"
                )
        else:
            raise ValueError(
                f"strategy.{key} is not a parameter of strategy={name} "
                f"(its parameters: {', '.join(sorted(taken | extra_ok)) or 'none'})"
            )
    return cls(**kwargs)


__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "Aggregator",
    "TooFewReplies",
    "make_aggregator",
    *(c.__name__ for c in _CLASSES.values()),
]
