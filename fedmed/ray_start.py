"""Start Ray while ``fedmed-sim`` is still importing, instead of after.

Flower's Ray backend calls ``ray.init`` only when Ray is not running yet, and only once the
simulation starts: after the driver has imported torch, torchvision, Flower and matplotlib. Both
take seconds (on 2 cores: about 3 s for Ray's GCS and raylet, 4 s of imports), and they do not
depend on each other, so ``fedmed-sim`` calls ``ray.init`` in a thread of its own as soon as the
configuration is checked, and the simulation finds Ray up.

On this machine Ray's workers inherit this process's environment, so ``PYTHONPATH`` is passed the
way Flower's backend passes it, in the environment, but without a ``runtime_env``: a job with a
runtime environment cannot use the workers Ray starts in advance, and each ClientApp actor then
waits for a fresh Python process. A cluster's workers do not inherit it: there the runtime
environment carries it, as in Flower.

A Ray instance of its own runs without the autoscaler monitor, as `ray start --head --no-monitor`
would start it (``ray.init`` has no such argument): a fixed instance on one machine never scales,
and ``ray.shutdown`` stops the monitor after the GCS it reports to, so the monitor never exits on
its own and every shutdown waited the full second Ray allows it before killing it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

# ray.init from a thread other than the main one says so; the main thread keeps SIGTERM for
# fedmed's own handler (fedmed.stopping), which is what fedmed wants.
_NOT_MAIN_THREAD = "SIGTERM handler is not set"


class _DropNotMainThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _NOT_MAIN_THREAD not in record.getMessage()


def flower_pythonpath() -> str:
    """``PYTHONPATH`` as Flower's Ray backend builds it: this process's ``sys.path`` first."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    return pythonpath


def _init(init_args: dict) -> None:
    import ray

    logging.getLogger("ray._private.worker").addFilter(_DropNotMainThread())
    pythonpath = flower_pythonpath()
    os.environ["PYTHONPATH"] = pythonpath
    if init_args.get("address") == "local":
        ray.init(**init_args)
        stop_autoscaler_monitor()
    else:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


def stop_autoscaler_monitor() -> None:
    """Kill the autoscaler monitor of the Ray instance this process just started (private: Ray's
    node object)."""
    from ray._private import ray_constants, worker

    for process_info in worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
        process_info.process.kill()  # SIGKILL: on SIGTERM it reports its end to the GCS first
        process_info.process.wait()


class RayStart:
    """``ray.init(**init_args)`` running in a thread; ``wait()`` returns once Ray is up (raising
    what ``ray.init`` raised), ``shutdown()`` stops it whether or not it came up.

    The thread lives until ``shutdown()``: Ray starts its GCS and raylet with a parent-death
    signal, which Linux sends when the *thread* that started them ends, not the process.
    """

    def __init__(self, init_args: dict) -> None:
        self._up = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(dict(init_args),), name="fedmed-ray", daemon=True)
        self._thread.start()

    def _run(self, init_args: dict) -> None:
        try:
            _init(init_args)
        except BaseException as error:  # handed to wait(), in the caller's thread
            self._error = error
        finally:
            self._up.set()
        self._release.wait()

    def wait(self) -> None:
        self._up.wait()
        if self._error is not None:
            raise self._error

    def shutdown(self) -> None:
        import ray

        self._up.wait()  # a shutdown while ray.init is half way would race it
        if ray.is_initialized():
            ray.shutdown()
        self._release.set()
        self._thread.join()
