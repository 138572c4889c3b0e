"""Flower 1.42's fixed waits in a deployed step, shortened: the one place fedmed changes them.

A message crosses three processes on its way to a site's ClientApp (server app -> SuperLink ->
SuperNode -> ClientApp process) and three on its way back. Flower has no settings for the waits
on that path, and on this machine they were most of a deployed step's cost beyond training
(README, "Benchmark: what a deployed step costs beyond training"):

* the SuperNode asks the SuperLink for a message and, when there is none, sleeps 3 s before
  asking again; it looks for its ClientApp's reply every 0.5 s (``start_client_internal``);
* the SuperNode tells the SuperLink it is alive every 30 s, and the SuperLink declares a site
  lost after two missed heartbeats: a site that died mid-round held the round about a minute
  (``HEARTBEAT_DEFAULT_INTERVAL``, which the SuperNode both sends and reports);
* a message is announced before its arrays have arrived (the SuperNode stores it, then pulls its
  objects), so the next process asks for objects that are not there yet and backs off 1 s, then
  2 s, then 4 s (``inflatable_utils.pull_objects``).

``cap_supernode_sleeps``, ``set_heartbeat_interval`` and ``shorten_object_pull_backoff`` replace
those waits in the process that calls them (``fedmed-supernode``, ``fedmed-warm-exec``'s ClientApp processes, the server
app). ``tests/test_private_apis.py`` fails with a message naming this module when the pinned
Flower changes what they replace.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

# where Flower's pull_objects is called from, each module holding its own reference to it: a
# ClientApp process (through pull_and_inflate_object_from_tree), the SuperNode, the server app
CLIENTAPP_PULLS = "flwr.supercore.inflatable.inflatable_utils"
SUPERNODE_PULLS = "flwr.supernode.start_client_internal"
SERVERAPP_PULLS = "flwr.superlink.grid.http_grid"
# the SuperNode's heartbeat: what it reports to the SuperLink, and how often its sender sends
HEARTBEAT_USERS = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")


class CappedSleeps:
    """The ``time`` module, with ``sleep`` capped at ``poll_s`` seconds."""

    def __init__(self, poll_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        self.poll_s, self._sleep = poll_s, sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.poll_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_supernode_sleeps(poll_s: float) -> None:
    """Make Flower's SuperNode loop wait at most ``poll_s`` seconds between its polls."""
    from flwr.supernode import start_client_internal

    clock = getattr(start_client_internal, "time", None)
    if clock is not time and not isinstance(clock, CappedSleeps):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer sleeps through the time module: "
            "fedmed/flower_waits.py does not fit this Flower version; use flower-supernode"
        )
    start_client_internal.time = CappedSleeps(poll_s)


def set_heartbeat_interval(seconds: float) -> None:
    """Make this process's SuperNode send a heartbeat, and report its interval, every ``seconds``
    (the SuperLink accepts 10 to 1800): a site that dies is then declared lost after about
    2 x ``seconds``."""
    import importlib

    for name in HEARTBEAT_USERS:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "HEARTBEAT_DEFAULT_INTERVAL", None), (int, float)):
            raise RuntimeError(
                f"{name} no longer reads HEARTBEAT_DEFAULT_INTERVAL: fedmed/flower_waits.py does not fit this "
                "Flower version; use flower-supernode"
            )
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def with_short_backoff(pull_objects: Callable, initial_s: float, cap_s: float) -> Callable:
    """``pull_objects`` retrying an object that has not arrived yet after ``initial_s`` seconds,
    doubling up to ``cap_s``; its other limits (tries, total time) unchanged."""
    if getattr(pull_objects, "short_backoff", False):
        return pull_objects

    @functools.wraps(pull_objects)
    def pull(*args, **kwargs):
        kwargs["initial_backoff"] = min(kwargs.get("initial_backoff", initial_s), initial_s)
        kwargs["backoff_cap"] = min(kwargs.get("backoff_cap", cap_s), cap_s)
        return pull_objects(*args, **kwargs)

    pull.short_backoff = True
    return pull


def shorten_object_pull_backoff(module_names: tuple[str, ...], initial_s: float = 0.05, cap_s: float = 0.5) -> None:
    """The reference to Flower's ``pull_objects`` in each of ``module_names`` (see
    ``PULL_OBJECTS_USERS``) with a short backoff."""
    import importlib

    for name in module_names:
        module = importlib.import_module(name)
        if not callable(getattr(module, "pull_objects", None)):
            raise RuntimeError(
                f"{name} no longer has pull_objects: fedmed/flower_waits.py does not fit this Flower version"
            )
        module.pull_objects = with_short_backoff(module.pull_objects, initial_s, cap_s)
