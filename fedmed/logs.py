"""fedmed's one logger, ``fedmed``, and where its records go.

Every module of fedmed, clients and strategies logs through ``log``. In ``fedmed-sim`` Hydra's
handlers on the root logger print and file its records. A deployed ServerApp runs in a process
Flower starts, where nothing configures the root logger: ``through_flower_handlers`` hands
fedmed's records to Flower's own handlers there (its console, and the upload that
``flwr log`` reads), instead of sending them through Flower's logger.
"""

from __future__ import annotations

import logging

LOGGER_NAME = "fedmed"
log = logging.getLogger(LOGGER_NAME)


def through_flower_handlers() -> None:
    """Let Flower's handlers carry fedmed's records too, where the root logger has none."""
    if logging.getLogger().handlers:
        return
    for handler in logging.getLogger("flwr").handlers:
        if handler not in log.handlers:
            log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# Flower's ClientAppActor logs this at WARNING as it ends; fedmed's simulation ends its actors on
# purpose after every run, and Ray forwarded the line to the console when it came in time.
ACTOR_END_NOTICE = "Manually terminating"


class _DropActorEndNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(ACTOR_END_NOTICE))


def without_actor_end_notice() -> None:
    """Drop Flower's notice that a simulation actor is ending, in this process (once)."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _DropActorEndNotice) for f in flower.filters):
        flower.addFilter(_DropActorEndNotice())
