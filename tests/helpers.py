"""Composing a run's configuration the way `fedmed-sim` does, for tests."""

import configs


def compose_config(*overrides: str):
    return configs.compose(overrides)


# Federation tests: a hung actor or a node that never connects fails the test within minutes
# instead of holding CI for the default hour (pytest's own timeout is the backstop).
BOUNDED_WAITS = ("federation.round_timeout_s=600", "federation.connect_timeout_s=300")
