"""Composing a run's configuration the way `fedmed-sim` does, for tests."""

from hydra import compose, initialize_config_module

from fedmed.config import register_configs


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="configs", version_base=None):
        return compose(config_name="config", overrides=list(overrides))
