"""The one place fedmed calls Flower's simulation engine.

Flower 1.42 deprecates ``flwr.simulation.run_simulation`` in favour of ``flwr run``. ``fedmed-sim``
keeps the Python entry point on purpose: ``flwr run`` always starts a local SuperLink that outlives
the command, packages and installs the app for every run, and takes its settings from the run
config rather than from a composed Hydra configuration (sweeps, typed overrides, the run folder).
``flwr run .`` stays supported for those who want it (README). What this adapter changes is only
what the console shows: the deprecation banner Flower logs on every call is dropped; every other
Flower message passes. And one thing that grows with the federation: Flower's simulation asks every
virtual node for a waiting message every 0.1 s, each question a pass over all waiting messages, so
1000 nodes cost the driver a core during rounds; ``pending_messages_only`` asks only the nodes that
have one. And one thing at the end of every run: Flower's runtime threads wait for their queues
with a 1 s timeout before they see the stop event, so every run ended a second late;
``pending_messages_only`` wakes them when the run stops (``_StopWaiting``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty, Queue

from flwr.server.superlink.fleet.vce import vce_api
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


_FLOWER_ADD_MESSAGES = vce_api.add_messages_to_queue
_FLOWER_PUT_REPLIES = vce_api.put_message_into_state


class _StopWaiting:
    """Put in the runtime's message queue once the run stops: a worker that takes it reads its
    ``metadata``, which passes it on to the next worker and raises ``Empty``, what the worker's
    ``queue.get(timeout=1.0)`` raises when nothing came; the worker then sees the stop event at
    once instead of after its timeout. It is never handed to a ClientApp."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue

    @property
    def metadata(self):
        self._queue.put(self)
        raise Empty


def add_pending_messages_to_queue(state, queue: Queue, nodes_mapping: dict, f_stop: threading.Event) -> None:
    """Flower's ``vce_api.add_messages_to_queue``, asking only the nodes that have an undelivered
    message (one pass over the waiting messages per sweep instead of one per node), and waking the
    workers when the run stops. A LinkState that does not keep the messages in memory gets
    Flower's own loop."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if store is None or lock is None:
        _FLOWER_ADD_MESSAGES(state, queue, nodes_mapping, f_stop)
    else:
        while not f_stop.is_set():
            with lock:
                waiting = {msg.metadata.dst_node_id for msg in list(store.values()) if msg.metadata.delivered_at == ""}
            for node_id in nodes_mapping:  # Flower's order, one message per node and sweep
                if node_id in waiting:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            f_stop.wait(0.1)
    queue.put(_StopWaiting(queue))


def put_replies_into_state(state, queue: Queue, f_stop: threading.Event) -> None:
    """Flower's ``vce_api.put_message_into_state``, looking at the stop event every 0.1 s
    instead of every second."""
    while not f_stop.is_set():
        try:
            state.store_message_res(queue.get(timeout=0.1))
        except Empty:
            pass


@contextmanager
def pending_messages_only() -> Iterator[None]:
    """Flower's simulation runtime polls with ``add_pending_messages_to_queue`` and
    ``put_replies_into_state`` meanwhile."""
    vce_api.add_messages_to_queue = add_pending_messages_to_queue
    vce_api.put_message_into_state = put_replies_into_state
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = _FLOWER_ADD_MESSAGES
        vce_api.put_message_into_state = _FLOWER_PUT_REPLIES


def simulate(server_app, client_app, num_supernodes: int, backend_config: dict) -> None:
    """Run ``server_app`` with ``num_supernodes`` virtual SuperNodes on Flower's Ray backend."""
    with without_deprecation_banner(), pending_messages_only():
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config
        )
