"""fedmed's one adapter over Flower's deprecated simulation entry point shows no banner."""

import logging

from flwr.supercore.logger import warn_deprecated_feature

from fedmed.simulation import without_deprecation_banner


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_run_simulation_banner_is_dropped():
    records = Records()
    logging.getLogger("flwr").addHandler(records)
    try:
        with without_deprecation_banner():
            warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
            warn_deprecated_feature("something else")
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed")
    finally:
        logging.getLogger("flwr").removeHandler(records)
    assert len(records.messages) == 2
    assert "something else" in records.messages[0]
    assert "run_simulation" in records.messages[1]  # outside the adapter Flower's logging is untouched
