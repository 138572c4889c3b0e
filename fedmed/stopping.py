"""Stopping a simulated run cleanly: SIGINT/SIGTERM, and clients that never reply.

Flower's simulation runs the ServerApp in a thread while the main thread waits for the Ray calls
of every message sent, each in a worker thread blocked in ``ray.get`` until its client returns.
A client that hangs therefore kept the process alive after the run, and a Ctrl-C used to
interrupt only the main thread's wait, leaving the ServerApp thread polling for replies until
``federation.round_timeout_s`` and the process at 0% CPU. So:

* ``release_client_actors`` kills the simulation's ClientApp actors with ``ray.kill``: each call
  still waiting on one fails at once and Flower's worker threads end. The ServerApp does this
  when it is done while some client never replied (``StopControl.clients_stuck``).
* The first SIGINT or SIGTERM sets ``requested`` (the ServerApp stops at its next poll), releases
  the actors and raises ``RunInterrupted`` in the main thread, which unwinds Flower's simulation
  (it shuts Ray down on the way); the runner then writes what is complete and exits non-zero.
* A second one exits the process at once.

``ray.init`` called in the main thread replaces the SIGTERM handler with its own ``sys.exit``;
the ServerApp thread then asks the main thread to take it back (SIGUSR1). ``fedmed-sim`` now calls
``ray.init`` in a thread of its own (``fedmed.ray_start``), where Ray sets no handler, so this is
a guard for a Ray started in the main thread, not a step every run needs.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading

CLIENT_ACTOR = "ClientAppActor"  # Flower's actor class for simulated ClientApps


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM (a BaseException, so that Flower's ``except Exception`` lets it through)."""


def release_client_actors() -> int:
    """Kill this driver's ClientApp actors (``ray.kill``); returns how many. Flower keeps their
    handles to itself, so they are found among the live objects."""
    import ray

    if not ray.is_initialized():
        return 0
    # type(o), not isinstance: isinstance reads o.__class__, and on some of torch's module-level
    # objects (torch.distributed.reduce_op) that prints a deprecation warning
    handles = [o for o in gc.get_objects() if issubclass(type(o), ray.actor.ActorHandle) and CLIENT_ACTOR in repr(o)]
    # Flower logs each call the kill ends with its traceback: noise, the server is done with them
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    for handle in handles:
        ray.kill(handle, no_restart=True)
    return len(handles)


class StopControl:
    """Shared by ``fedmed-sim``'s main thread and its ServerApp thread."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.clients_stuck = False
        self._signals = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take SIGINT and SIGTERM (main thread only)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._take_sigterm_back)

    def take_signals_back(self) -> None:
        """From the ServerApp thread once Ray runs: ``ray.init`` put its own SIGTERM handler in
        place (``sys.exit``), and only the main thread may set handlers, so ask it with SIGUSR1."""
        if signal.SIGUSR1 in self._previous:
            os.kill(os.getpid(), signal.SIGUSR1)

    def _take_sigterm_back(self, signum, frame) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self._signals += 1
        if self._signals > 1:
            print(f"\n{name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"\n{name}: stopping the run ({name} again to exit at once)", file=sys.stderr, flush=True)
        self.requested.set()
        release_client_actors()
        raise RunInterrupted(name)


def exit_leaving_stuck_threads(code: int, grace_s: float = 5.0) -> None:
    """Exit with ``code`` once everything is written. Threads still running get ``grace_s`` to end
    (after an interruption, ``grace_s=0``: the ServerApp thread may be in the middle of a step);
    one that waits on something that never returns is left behind. The interpreter's own
    teardown is skipped too: with torch, torchvision and Flower loaded it took 1.4 s on 2 cores
    and writes nothing (logs and standard streams are flushed here first)."""
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for thread in stuck:
        thread.join(grace_s / max(len(stuck), 1))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
