"""Many clients: nothing is built per client for clients that are not sampled.

The simulated split is cut once, as index arrays, and shipped to the clients in one file; a
client reads its own slice and builds its own site shift only; the server's table, plot and
connection log summarise a large federation instead of listing every client; Flower's simulation
asks only nodes that have a message waiting. The last test runs a 200-client federation through
Ray (slow).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
import time
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import fedmed.data
from fedmed.data import client_partitions, client_share, read_partition, write_partitions
from fedmed.job import Job, encode_job
from fedmed.partition_report import MAX_LISTED_CLIENTS, format_label_table, label_count_table, plot_label_counts
from fedmed.simulation import _StopWaiting, add_pending_messages_to_queue
from fedmed.site_shift import site_shift, site_shifts
from strategies.nodes import MAX_NAMED, discover
from tests.helpers import BOUNDED_WAITS, compose_config
from tests.test_nodes import FakeGrid

MANY = 1000
# PneumoniaMNIST's training split: 4708 images, 26% normal
PNEUMONIA_LABELS = np.random.default_rng(0).permutation(np.repeat([0, 1], [1214, 3494]))


@pytest.fixture(scope="module")
def many_iid() -> list[np.ndarray]:
    return client_partitions(PNEUMONIA_LABELS, MANY, {"name": "iid"}, seed=0, dataset_name="scale-test")


def test_a_thousand_iid_partitions_are_index_arrays(many_iid):
    assert len(many_iid) == MANY
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in many_iid)
    assert {len(p) for p in many_iid} == {4, 5}
    assert sum(len(p) for p in many_iid) == len(PNEUMONIA_LABELS)


def test_dirichlet_that_cannot_give_a_thousand_clients_their_minimum_names_the_keys():
    with pytest.raises(ValueError) as error:
        client_partitions(PNEUMONIA_LABELS, MANY, {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 2}, 0)
    for key in ("federation.num_clients=1000", "partition.alpha=0.5", "partition.min_partition_size=2"):
        assert key in str(error.value)


def test_a_client_reads_its_own_slice_of_the_partitions_file(many_iid, tmp_path):
    path = write_partitions(many_iid, tmp_path / "partitions.npy")
    for pid in (0, 1, 517, MANY - 1):
        np.testing.assert_array_equal(read_partition(path, pid, MANY), many_iid[pid])
    with pytest.raises(ValueError, match="partition-id 1000 outside 0..999"):
        read_partition(path, MANY, MANY)
    with pytest.raises(ValueError, match="holds 1000 partitions, not num-partitions=10"):
        read_partition(path, 0, 10)


def small_job(num_clients: int, *overrides: str) -> Job:
    cfg = compose_config(
        f"federation.num_clients={num_clients}", f"federation.clients_per_round={num_clients}", *overrides
    )
    return Job.from_config(cfg)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "site"])
def test_with_the_file_a_client_never_cuts_the_whole_split(partition, tmp_path, monkeypatch):
    # 10 images a client: dirichlet needs a flat alpha to give each at least two
    job = small_job(200, f"partition={partition}", "partition.alpha=5", "partition.min_partition_size=2")
    expected = client_share(job, 123, 200)  # cut here, every partition at once (the fallback)
    dataset = fedmed.data.dataset_from_config(job.dataset, job.seed)
    partitions = client_partitions(dataset.train.labels, 200, dataclasses.asdict(job.partition), job.seed, dataset.name)
    job.partitions_file = str(write_partitions(partitions, tmp_path / "partitions.npy"))

    def refuse(*args, **kwargs):
        raise AssertionError("a client with the partitions file cut the split itself")

    monkeypatch.setattr(fedmed.data, "client_partitions", refuse)
    share = client_share(job, 123, 200)
    np.testing.assert_array_equal(share.train_indices, expected.train_indices)
    np.testing.assert_array_equal(share.val_indices, expected.val_indices)
    assert share.site_shift == expected.site_shift


def test_a_client_with_the_file_loads_no_partitioning_library(tmp_path):
    """flwr-datasets and what it pulls in (datasets, pandas, matplotlib) cost 190 MB in each Ray worker."""
    job = small_job(20)
    dataset = fedmed.data.dataset_from_config(job.dataset, job.seed)
    partitions = client_partitions(dataset.train.labels, 20, dataclasses.asdict(job.partition), job.seed, dataset.name)
    job.partitions_file = str(write_partitions(partitions, tmp_path / "partitions.npy"))
    script = (
        "import sys; from fedmed.data import client_share; from fedmed.job import decode_job; "
        f"share = client_share(decode_job({encode_job(job)!r}), 3, 20); "
        "print(len(share.train_indices), sorted({m.split('.')[0] for m in sys.modules} "
        "& {'flwr_datasets', 'datasets', 'pandas', 'matplotlib'}))"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    assert out == [str(len(client_share(job, 3, 20).train_indices)), "[]"]


def test_one_site_shift_is_the_same_as_in_the_whole_list():
    shifts = site_shifts(300, seed=5, strength=1.5)
    for site in (0, 1, 2, 150, 299):
        assert site_shift(site, seed=5, strength=1.5) == shifts[site]
    with pytest.raises(ValueError, match="site must be a non-negative integer"):
        site_shift(-1, seed=0)


def test_a_large_federation_is_summarised_in_the_table_and_the_plot(many_iid, tmp_path):
    counts = label_count_table(PNEUMONIA_LABELS, many_iid, 2)
    table = format_label_table(counts, ["normal", "pneumonia"])
    assert [c.header for c in table.columns] == ["clients", "normal", "pneumonia", "total"]
    assert list(table.columns[0].cells) == ["min", "median", "mean", "max"]
    assert list(table.columns[-1].cells) == ["4", "5", "4.708", "5"]
    with Image.open(plot_label_counts(counts, ["normal", "pneumonia"], tmp_path / "partition.png")) as image:
        assert image.size == (1320, 480)  # 11 x 4 inches at 120 dpi, whatever the number of clients
    # small federations keep one row per client
    assert format_label_table(counts[:MAX_LISTED_CLIENTS], ["normal", "pneumonia"]).row_count == MAX_LISTED_CLIENTS


@pytest.mark.usefixtures("task_identity")
def test_connecting_a_thousand_nodes_logs_counts_not_every_name(caplog):
    grid = FakeGrid({10_000 + pid: pid for pid in range(MANY)})
    with caplog.at_level(logging.INFO):
        federation = discover(grid, MANY, timeout=30)
    assert len(federation.partition_of_node) == MANY
    line = next(r.getMessage() for r in caplog.records if f"{MANY} of {MANY} sites connected" in r.getMessage())
    assert line.count("partition ") == MAX_NAMED and line.endswith(f"and {MANY - MAX_NAMED} more")


class FakeLinkState:
    """Flower's in-memory LinkState as far as the simulation's polling sees it."""

    def __init__(self, waiting: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))
            for mid, node in waiting.items()
        }
        self.asked: list[int] = []

    def get_message_ins(self, node_id: int, limit: int) -> list:
        self.asked.append(node_id)
        for msg in self.message_ins_store.values():
            if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                msg.metadata.delivered_at = "now"
                return [msg]
        return []


def test_the_simulation_asks_only_nodes_with_a_waiting_message():
    state = FakeLinkState({"a": 5, "b": 9, "c": 9})
    queue, stop = Queue(), threading.Event()
    nodes = dict.fromkeys(range(MANY))
    poller = threading.Thread(target=add_pending_messages_to_queue, args=(state, queue, nodes, stop))
    poller.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    poller.join()
    *messages, wake_up = list(queue.queue)
    assert len(messages) == 3 and set(state.asked) == {5, 9}  # not the 998 nodes without one
    assert isinstance(wake_up, _StopWaiting)  # then the runtime's workers are woken to stop


@pytest.mark.slow
def test_a_200_client_federation_completes(tmp_path):
    from fedmed.runner import run

    cfg = compose_config(
        *BOUNDED_WAITS,
        "federation.num_clients=200",
        "federation.clients_per_round=2",
        "federation.rounds=1",
        "dataset.size=16",
        "client.batch_size=8",
        "eval.attacks=[]",
        "progress=false",
        f"output_dir={tmp_path}",
    )
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["num_clients"] == 2
    assert summary["status"] == "completed" and (tmp_path / "plots" / "partition.png").exists()
