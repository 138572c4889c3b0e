"""A federation on the test run's real two-node Ray cluster (``tests/ray_cluster.py``: `ray start
--head` with two CPUs and a second node joined with `ray start --address` with one). With one CPU
per client the run has three ClientApp actors, so the cluster must place one on the second node.
The run joins it with `ray.address=` and must equal a local run's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_end_to_end import without_timings

pytestmark = pytest.mark.slow

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
                node = actor["Address"]["NodeID"]
                # an actor not placed yet (or no longer) shows Ray's nil id, all "f": on no node
                if actor.get("ActorClassName") == "ClientAppActor" and node.strip("f"):
                    nodes.add(node)
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
