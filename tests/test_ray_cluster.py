"""A federation on a real two-node Ray cluster: `ray start --head` and a second node joined with
`ray start --address` on this machine, each with one CPU, so that two clients at a time must sit
on different nodes. The run joins it with `ray.address=` and must equal a local run's numbers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_end_to_end import without_timings

pytestmark = pytest.mark.slow

CLUSTER_START_S = 120
TINY = (
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    "dataset.n_train=400",
    "dataset.n_test=100",
    "eval.attacks=[fgsm]",
    "eval.eps=[0.0314]",
    "eval.max_samples=32",
    "seed=5",
    "progress=false",
    "federation.round_timeout_s=600",
    "federation.connect_timeout_s=300",
)


def free_port() -> int:
    """A free port below Ray's worker port range (10002-19999), which its GCS may not use."""
    for port in range(6400, 9000):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 6400-8999 for Ray's head node")


# Ray registers the node under the machine's own address even with --node-ip-address=127.0.0.1
# and connects to that (ray-project/ray#59110, open): its servers are this machine's, started and
# stopped by the fixture, but not reachable on loopback alone.
def ray_node(*args: str) -> subprocess.Popen:
    """`ray start ... --block`: it stops the Ray processes it started when it is terminated."""
    return subprocess.Popen(
        ["ray", "start", "--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"},
    )


def alive_nodes(address: str) -> int:
    """Alive nodes of the cluster at ``address``, asked from a child process (this one stays no
    Ray driver, so that it can connect again later)."""
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
    return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0


def stop(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


@pytest.fixture(scope="module")
def ray_cluster():
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [
        ray_node("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false"),
    ]
    try:
        deadline = time.monotonic() + CLUSTER_START_S
        while alive_nodes(address) < 1:
            assert time.monotonic() < deadline, f"Ray's head node at {address} did not start in {CLUSTER_START_S} s"
            assert nodes[0].poll() is None, f"`ray start --head` exited with {nodes[0].returncode}"
        nodes.append(ray_node(f"--address={address}", "--node-ip-address=127.0.0.1"))
        while alive_nodes(address) < 2:
            assert time.monotonic() < deadline, f"the second Ray node did not join {address} in {CLUSTER_START_S} s"
            assert nodes[1].poll() is None, f"`ray start --address` exited with {nodes[1].returncode}"
        yield address
    finally:
        for node in reversed(nodes):
            stop(node)


def client_actor_nodes(address: str, until: threading.Event) -> set[str]:
    """Ids of the nodes on which Flower's ClientApp actors ran, polled until ``until`` is set.

    Ray's public state API (`ray.util.state`) needs the dashboard, which `flwr[simulation]`'s
    Ray leaves out; its GCS actor table (`ray._private.state.actors`) is the one place left.
    """
    import ray
    from ray._private import state

    nodes: set[str] = set()
    ray.init(address=address, logging_level="ERROR")
    try:
        while not until.is_set():
            for actor in state.actors().values():
                if actor.get("ActorClassName") == "ClientAppActor":
                    nodes.add(actor["Address"]["NodeID"])
            until.wait(0.5)
    finally:
        ray.shutdown()
    return nodes


def federation(out: Path, *overrides: str) -> list[dict]:
    subprocess.run(
        [sys.executable, "-m", "fedmed", *TINY, *overrides, f"output_dir={out}", f"hydra.run.dir={out}/hydra"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        capture_output=True,
        timeout=900,
    )
    return [without_timings(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clients_run_on_both_nodes_and_results_equal_a_local_run(tmp_path, ray_cluster):
    done = threading.Event()
    placed: list[set[str]] = []
    watcher = threading.Thread(target=lambda: placed.append(client_actor_nodes(ray_cluster, done)))
    watcher.start()
    try:
        on_cluster = federation(tmp_path / "cluster", f"ray.address={ray_cluster}")
    finally:
        done.set()
        watcher.join(timeout=60)
    assert placed and len(placed[0]) == 2, placed
    # a local run, the model in shared memory (the cluster's travels inside the messages)
    assert federation(tmp_path / "local") == on_cluster
