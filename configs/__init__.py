"""fedmed's Hydra configuration: ``config.yaml`` and the yaml groups in this folder, plus every
group option a registry defines in code (datasets, models, client defences and poisoning attacks
in ``fedmed/``, aggregation rules in ``strategies/aggregators/``).

This package is the application's configuration, above both layers: with ``fedmed/runner.py`` it
is the one place that sees ``fedmed/`` and ``strategies/`` together. ``register()`` stores every
registry's options in Hydra's ConfigStore; ``compose()`` composes a run's configuration as
``fedmed-sim`` does.
"""

from __future__ import annotations


def register() -> None:
    """Store every structured option in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from fedmed.config import register_configs
    from strategies.aggregators import store_configs

    register_configs()
    store_configs(ConfigStore.instance())


def compose(overrides=()):
    """The configuration ``fedmed-sim`` would compose from ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register()
    with initialize_config_module(config_module="configs", version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))
