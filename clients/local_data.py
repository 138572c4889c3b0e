"""Where a client's data comes from: its simulated partition, or its hospital's own files."""

from __future__ import annotations

from fedmed.data import ClientShare, client_share, site_share

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"


def partition_id(node_config: dict, node_id: int) -> int:
    """Simulated nodes carry ``partition-id``; a deployed site reports its node id instead."""
    return int(node_config.get(PARTITION_ID, node_id))


def is_simulated(node_config: dict) -> bool:
    """A simulated partition (the only kind that can be made malicious), not a deployed site."""
    return DATA_PATH not in node_config and PARTITION_ID in node_config


def local_share(job: dict, node_config: dict) -> ClientShare:
    """Simulation: ``partition-id``/``num-partitions`` in ``node_config``; deployment: ``data-path``."""
    if DATA_PATH in node_config:
        return site_share(str(node_config[DATA_PATH]), job)
    if PARTITION_ID not in node_config:
        raise KeyError(
            "node_config has neither 'partition-id' (simulation) nor 'data-path' (deployment); "
            "start the SuperNode with --node-config \"data-path=/path/to/site.npz\""
        )
    num_partitions = int(node_config.get(NUM_PARTITIONS, job["num_clients"]))
    return client_share(job, int(node_config[PARTITION_ID]), num_partitions)
