"""Composing a run's configuration the way `fedmed-sim` does, for tests."""

from hydra import compose, initialize_config_module

from fedmed.config import register_configs


def compose_config(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="configs", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# Federation tests: a hung actor or a node that never connects fails the test within minutes
# instead of holding CI for the default hour (pytest's own timeout is the backstop).
BOUNDED_WAITS = ("federation.round_timeout_s=600", "federation.connect_timeout_s=300")
