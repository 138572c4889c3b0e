"""Cut partitions kept on disk: a later run reads them back without flwr-datasets, and a damaged
cache file is cut again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedmed.data
from fedmed.data import client_partitions
from fedmed.partition import partition_indices
from fedmed.partition_cache import partition_key
from fedmed.seeds import Stream, seed_for

LABELS = np.random.default_rng(3).integers(0, 4, size=600)
DIRICHLET = {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 10}

# One process cuts (or reads) a split and says whether it imported flwr-datasets.
CHILD = """
import json, sys
import numpy as np
from fedmed.data import client_partitions
labels = np.random.default_rng(3).integers(0, 4, size=600)
parts = client_partitions(labels, 6, {"name": "dirichlet", "alpha": 0.5, "min_partition_size": 10}, 9, "t")
print(json.dumps({"flwr_datasets": "flwr_datasets" in sys.modules, "parts": [p.tolist() for p in parts]}))
"""


def cut_in_a_fresh_process(cache: Path) -> dict:
    env = {**os.environ, "FEDMED_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def cached_file(cache: Path, seed: int = 9) -> Path:
    split_seed = seed_for(seed, Stream.DATA_SPLIT)
    return cache / "partitions" / f"{partition_key(LABELS, 6, 'dirichlet', split_seed, 0.5, 10)}.npy"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDMED_CACHE", str(tmp_path))
    fedmed.data._partitions.cache_clear()
    yield tmp_path
    fedmed.data._partitions.cache_clear()


def test_a_second_run_reads_the_split_without_flwr_datasets(tmp_path):
    first = cut_in_a_fresh_process(tmp_path)
    second = cut_in_a_fresh_process(tmp_path)
    assert first["flwr_datasets"] and not second["flwr_datasets"]
    assert second["parts"] == first["parts"]
    expected = partition_indices(LABELS, 6, "dirichlet", seed=seed_for(9, Stream.DATA_SPLIT), alpha=0.5)
    assert first["parts"] == [p.tolist() for p in expected]


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"not a numpy file"),
        lambda path: path.write_bytes(path.read_bytes()[:-40]),  # cut short
        lambda path: np.save(path, np.zeros(2 + 6 + 600, dtype=np.int64)),  # right size, not a split
        lambda path: np.save(path, np.load(path).astype(np.float64)),
    ],
    ids=["garbage", "truncated", "not-a-split", "float64"],
)
def test_a_damaged_cache_file_is_cut_again_and_replaced(cache, damage):
    first = client_partitions(LABELS, 6, DIRICHLET, seed=9)
    path = cached_file(cache)
    assert path.exists()
    damage(path)
    fedmed.data._partitions.cache_clear()
    again = client_partitions(LABELS, 6, DIRICHLET, seed=9)
    assert [p.tolist() for p in again] == [p.tolist() for p in first]
    table = np.load(path)
    assert table.dtype == np.int64 and len(table) == 2 + 6 + 600


def test_every_input_of_the_split_names_its_own_file(cache):
    client_partitions(LABELS, 6, DIRICHLET, seed=9)
    client_partitions(LABELS, 6, DIRICHLET, seed=10)
    client_partitions(LABELS, 6, {**DIRICHLET, "alpha": 1.0}, seed=9)
    client_partitions(LABELS, 5, DIRICHLET, seed=9)
    client_partitions(LABELS[:-1], 6, DIRICHLET, seed=9)
    assert len(list((cache / "partitions").glob("*.npy"))) == 5
    assert not list((cache / "partitions").glob("*.partial"))


def test_a_cache_folder_that_cannot_be_written_only_costs_the_time(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("FEDMED_CACHE", str(blocked))
    fedmed.data._partitions.cache_clear()
    try:
        parts = client_partitions(LABELS, 6, DIRICHLET, seed=9)
    finally:
        fedmed.data._partitions.cache_clear()
    assert sum(len(p) for p in parts) == len(LABELS)
