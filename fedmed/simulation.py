"""The one place fedmed calls Flower's simulation engine.

Flower 1.42 deprecates ``flwr.simulation.run_simulation`` in favour of ``flwr run``. ``fedmed-sim``
keeps the Python entry point on purpose: ``flwr run`` always starts a local SuperLink that outlives
the command, packages and installs the app for every run, and takes its settings from the run
config rather than from a composed Hydra configuration (sweeps, typed overrides, the run folder).
``flwr run .`` stays supported for those who want it (README). What this adapter changes is only
what the console shows: the deprecation banner Flower logs on every call is dropped; every other
Flower message passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.simulation import run_simulation

_BANNER = "`run_simulation` function is deprecated"


class _DropDeprecationBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _BANNER not in record.getMessage()


@contextmanager
def without_deprecation_banner() -> Iterator[None]:
    """Drop Flower's ``run_simulation`` deprecation banner (on its logger and its handlers)."""
    flwr_logger = logging.getLogger("flwr")
    banner_filter = _DropDeprecationBanner()
    targets = [flwr_logger, *flwr_logger.handlers]
    for target in targets:
        target.addFilter(banner_filter)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(banner_filter)


def simulate(server_app, client_app, num_supernodes: int, backend_config: dict) -> None:
    """Run ``server_app`` with ``num_supernodes`` virtual SuperNodes on Flower's Ray backend."""
    with without_deprecation_banner():
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config
        )
