"""Where a client's data comes from: its simulated partition, or its hospital's own files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fedmed.data import ClientShare, client_share, site_share

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
SITE = "site"


def partition_id(node_config: dict, node_id: int) -> int:
    """Simulated nodes carry ``partition-id``; a deployed site stands for itself by the number
    its name hashes to (``site_number``), never by its node id, which changes between runs."""
    if PARTITION_ID in node_config:
        return int(node_config[PARTITION_ID])
    if DATA_PATH in node_config:
        return site_number(site_name(node_config))
    return int(node_id)


def site_name(node_config: dict) -> str:
    """A deployed site's stable name: node config ``site``, else its data file's stem."""
    if SITE in node_config:
        return str(node_config[SITE])
    return Path(str(node_config[DATA_PATH])).stem


def site_number(name: str) -> int:
    """A stable 63-bit number for a site name, for seeds that do not depend on random node ids."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def is_simulated(node_config: dict) -> bool:
    """A simulated partition (the only kind that can be made malicious), not a deployed site."""
    return DATA_PATH not in node_config and PARTITION_ID in node_config


def site_class_counts(node_config: dict) -> list[int]:
    """Examples per class (train and val) in a deployed site's data, read from its labels only."""
    path = Path(str(node_config[DATA_PATH])).expanduser()
    if path.is_dir():
        from fedmed.imagefolder import class_counts

        return class_counts(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"site data file {path} (node config data-path) does not exist")
    with np.load(path) as arrays:
        labels = np.concatenate([arrays["train_labels"].reshape(-1), arrays["val_labels"].reshape(-1)])
    if labels.size and labels.min() < 0:
        raise ValueError(f"site data file {path} has label {labels.min()}: labels must be 0..num_classes-1")
    return np.bincount(labels.astype(np.int64)).tolist()


def local_share(job: dict, node_config: dict) -> ClientShare:
    """Simulation: ``partition-id``/``num-partitions`` in ``node_config``; deployment: ``data-path``."""
    if DATA_PATH in node_config:
        return site_share(str(node_config[DATA_PATH]), job)
    if PARTITION_ID not in node_config:
        raise KeyError(
            "node_config has neither 'partition-id' (simulation) nor 'data-path' (deployment); "
            """start the SuperNode with --node-config 'data-path="/path/to/site.npz"' (values are TOML: """
            "strings in double quotes)"
        )
    num_partitions = int(node_config.get(NUM_PARTITIONS, job["num_clients"]))
    return client_share(job, int(node_config[PARTITION_ID]), num_partitions)
