"""`fedmed-warm-exec`: a hospital SuperNode's ClientApp executor that keeps PyTorch imported.

Flower 1.42 runs every message a SuperNode receives in a fresh `flwr-clientapp` process, which
spends most of a step importing PyTorch, torchvision and Flower before the app runs. Started with
``flower-supernode --isolation process``, the SuperNode leaves launching those processes to a
separate executor. This one is Flower's own `flower-superexec` loop with one change: it imports
the heavy libraries once, then forks a process per message that runs Flower's `flwr-clientapp`
code (``run_clientapp``). The app itself is still imported fresh, in each forked process, from
the run's FAB, exactly as `flwr-clientapp` does.

    flower-supernode --isolation process --port 9094 ... &
    fedmed-warm-exec --runtime-api-address 127.0.0.1:9094

Flower has no public hook for an executor, so this replaces ``get_executor`` in Flower's
``run_superexec`` module; it is checked against Flower 1.42 (pyproject pins ``flwr<1.43``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# what a fresh `flwr-clientapp` process spends its time importing before fedmed's code runs
PRELOADED = (
    "numpy",
    "torch",
    "torchvision",
    "safetensors.torch",
    "omegaconf",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)


def preload() -> None:
    for name in PRELOADED:
        importlib.import_module(name)


def _child(spec) -> int:
    """In the forked process: Flower's `flwr-clientapp` for the task, with its exit code."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # this executor is itself part of the `fedmed` package: forget it, so that the app's fedmed
    # comes from the run's FAB like its clients/ and strategies/, not from this site's install
    for name in [n for n in sys.modules if n == "fedmed" or n.startswith("fedmed.")]:
        del sys.modules[name]
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=None,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
    except SystemExit as done:  # Flower ends the task with flwr_exit
        return done.code if isinstance(done.code, int) else 1
    return 0


def make_fork_executor():
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    class ForkExecutor(SubprocessExecutor):
        """Flower's subprocess executor, with a fork of this warm process instead of a new one."""

        def __init__(self) -> None:
            self.children: set[int] = set()

        def launch(self, spec) -> LaunchResult:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(spec)
                finally:
                    os._exit(code)
            self.children.add(pid)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            """Reap the tasks that have ended."""
            for pid in list(self.children):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.children.discard(pid)

    return ForkExecutor()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedmed-warm-exec", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runtime-api-address",
        required=True,
        help="the SuperNode's Runtime API, host:port (its --port, 9094 by default)",
    )
    parser.add_argument(
        "--root-certificates",
        default=None,
        help="CA of the SuperNode's Runtime API certificate when it serves TLS "
        "(--ssl-certfile); without it the local Runtime API is plain HTTP",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preload()
    from flwr.supercore.superexec import run_superexec as superexec

    from fedmed.flower_waits import CLIENTAPP_PULLS, shorten_object_pull_backoff

    # in this process, so that every forked ClientApp process inherits it: a message's arrays are
    # still arriving at the SuperNode when its ClientApp asks for them (fedmed/flower_waits.py)
    shorten_object_pull_backoff((CLIENTAPP_PULLS,))

    # Flower's executor looks for a new task every second by default; a fork is cheap, so look often
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    executor = make_fork_executor()
    superexec.get_executor = lambda *_args, **_kwargs: executor
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.root_certificates is None,
        root_certificates_path=args.root_certificates,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
