"""A real two-node Ray cluster on this machine for the federation tests: `ray start --head` and a
second node joined with `ray start --address`. ``conftest.py`` starts one per pytest process, the
first time a test asks for it, and stops it when the test run ends, also when tests fail.

The head has two CPUs, the second node one. A run asking two CPUs per client (``ONE_ACTOR``, what
the ``on_cluster`` fixture adds) fits on the head only: one ClientApp actor per run. Each actor's
start costs about 5 s of CPU (it imports PyTorch and Flower's simulation), and on the 2-core CI
machine the suite is bound by CPU, so a second actor per run only added that cost. A run asking one
CPU per client gets three actors, on both nodes (``tests/test_ray_cluster.py``'s placement test).
The nodes' workers keep one OpenMP thread whatever their CPUs (``OMP_NUM_THREADS=1``), as a
one-CPU actor has: two threads per actor on two busy cores wait on each other.

One per pytest process, not one for all of them: Flower sizes a run's actor pool from the
cluster's *total* resources (``pool_size_from_resources``), so two runs sharing a cluster at the
same moment (``pytest -n 2``) would each create actors for all of it, and one run's actors would
wait for the other's to end.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from tests.deployment import free_port, xdist_worker_index

START_S = 120
# the head's port: below Ray's worker port range (10002-19999), which its GCS may not use; each
# pytest-xdist worker searches its own range, or two workers starting their clusters at the same
# moment both found 6400 free and one head's GCS failed to bind it
HEAD_PORTS_FROM = 6400
HEAD_PORTS_PER_WORKER = 50


def head_ports_from() -> int:
    return HEAD_PORTS_FROM + HEAD_PORTS_PER_WORKER * xdist_worker_index()


OBJECT_STORE_BYTES = 500_000_000  # per node; a test run's models are tens of MB
HEAD_CPUS, SECOND_NODE_CPUS = 2, 1
ONE_ACTOR = f"ray.num_cpus_per_client={HEAD_CPUS}"
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child: SIGTERM when the pytest process that started it dies, even by SIGKILL, so a
    killed test run leaves no cluster behind (`ray start --block` then stops its processes)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# Ray registers the node under the machine's own address even with --node-ip-address=127.0.0.1
# and connects to that (ray-project/ray#59110, open): its servers are this machine's, started and
# stopped here, but not reachable on loopback alone.
def _ray_node(num_cpus: int, *args: str) -> subprocess.Popen:
    """`ray start ... --block`: it stops the Ray processes it started when it is terminated."""
    return subprocess.Popen(
        [
            "ray",
            "start",
            "--block",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_stop_with_parent,
        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "OMP_NUM_THREADS": "1"},
    )


def alive_nodes(address: str) -> int:
    """Alive nodes of the cluster at ``address``, asked from a child process (this one stays no
    Ray driver, so that federations in it can connect later)."""
    try:
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
                "print(sum(n['Alive'] for n in ray.nodes()))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:  # no GCS answering yet: the caller's deadline decides
        return 0
    return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0


def _stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


class RayCluster:
    """``start()`` brings up the head and the second node and returns the address to give as
    ``ray.address=``; ``stop()`` ends every Ray process they started."""

    def __init__(self) -> None:
        self.nodes: list[subprocess.Popen] = []
        self.address = ""

    def start(self) -> str:
        port = free_port(head_ports_from())
        self.address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + START_S
        self.nodes.append(_ray_node(HEAD_CPUS, "--head", f"--port={port}", "--include-dashboard=false"))
        self._wait_for(1, deadline, "Ray's head node", "`ray start --head`")
        self.nodes.append(_ray_node(SECOND_NODE_CPUS, f"--address={self.address}"))
        self._wait_for(2, deadline, "the second Ray node", "`ray start --address`")
        return self.address

    def _wait_for(self, count: int, deadline: float, what: str, command: str) -> None:
        while alive_nodes(self.address) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not come up at {self.address} in {START_S} s")
            if self.nodes[-1].poll() is not None:
                raise RuntimeError(f"{command} exited with {self.nodes[-1].returncode}")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _stop(node)
        self.nodes.clear()
