"""Where a client's data comes from: its simulated partition, or its hospital's own files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fedmed.data import ClientShare, client_share, site_share
from fedmed.job import Job
from fedmed.site_data import default_site_name, examples_per_class

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_PATH = "data-path"
SITE = "site"
DEVICE = "device"
SITE_DEVICES = ("auto", "cpu", "cuda")
NODE_CONFIG_HINT = "start the SuperNode with --node-config 'data-path=\"/path/to/site.npz\"' (TOML: quote the value)"


def partition_id(node_config: dict, node_id: int) -> int:
    """Simulated nodes carry ``partition-id``; a deployed site stands for itself by the number
    its name hashes to (``site_number``), never by its node id, which changes between runs."""
    if PARTITION_ID in node_config:
        return int(node_config[PARTITION_ID])
    if DATA_PATH in node_config:
        return site_number(site_name(node_config))
    return int(node_id)


def site_number(name: str) -> int:
    """A stable 63-bit number for a site name, for seeds that do not depend on random node ids."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def is_simulated(node_config: dict) -> bool:
    """A simulated partition (the only kind that can be made malicious), not a deployed site."""
    return DATA_PATH not in node_config and PARTITION_ID in node_config


def site_name(node_config: dict) -> str:
    """A node's stable name: node config ``site``, else its data file's stem (``site-3.npz`` ->
    ``site-3``) or its image folder's name; simulated partition i is ``site-i``, the name
    ``fedmed-sites`` gives the file of the same partition."""
    if SITE in node_config:
        name = str(node_config[SITE]).strip()
        if not name:
            raise ValueError("node config site is empty; give the site a name, e.g. --node-config 'site=\"a\"'")
        return name
    if DATA_PATH in node_config:
        return Path(str(node_config[DATA_PATH])).expanduser().name.removesuffix(".npz")
    if PARTITION_ID in node_config:
        return default_site_name(node_config[PARTITION_ID])
    raise KeyError(
        f"node_config has neither 'partition-id' (simulation) nor 'data-path' (deployment); {NODE_CONFIG_HINT}"
    )


def class_counts(share: ClientShare) -> dict[str, list[int]]:
    """Examples per class in the share's training and validation parts: what a site tells the
    server about its data (never the images)."""
    return {
        part: examples_per_class(share.labels[indices], share.num_classes)
        for part, indices in (("train", share.train_indices), ("val", share.val_indices))
    }


def site_class_counts(node_config: dict) -> list[int]:
    """Examples per class (train and val) in a deployed site's data, read from its labels only:
    the answer to the server's first query, which carries no job to read the images by."""
    path = Path(str(node_config[DATA_PATH])).expanduser()
    if path.is_dir():
        from fedmed.imagefolder import class_counts as folder_counts

        return folder_counts(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"site data file {path} (node config data-path) does not exist")
    with np.load(path, allow_pickle=False) as arrays:
        labels = np.concatenate([arrays["train_labels"].reshape(-1), arrays["val_labels"].reshape(-1)])
    if labels.size and labels.min() < 0:
        raise ValueError(f"site data file {path} has label {labels.min()}: labels must be 0..num_classes-1")
    return np.bincount(labels.astype(np.int64)).tolist()


def device_setting(job: Job, node_config: dict) -> str:
    """A deployed site trains on its own ``device`` (node config; ``auto`` by default); the job's
    device applies to simulated clients only."""
    if DATA_PATH not in node_config:
        return job.device
    device = str(node_config.get(DEVICE, "auto"))
    if device.split(":")[0] not in SITE_DEVICES:
        raise ValueError(f'node config device={device!r}: use "auto", "cpu" or "cuda" ("cuda:N" for one GPU)')
    return device


def refuse_simulation_only(job: Job) -> None:
    """What a server may not ask of a deployed site: poisoning attacks exist for simulation."""
    attack = job.attack.name
    if attack != "none":
        raise ValueError(
            f"this node is a deployed site (node config data-path) and the run asks for attack={attack}: "
            "attack= is simulation only, a site never poisons its update; run the federation with "
            "attack=none"
        )


def local_share(job: Job, node_config: dict) -> ClientShare:
    """Simulation: ``partition-id``/``num-partitions`` in ``node_config``; deployment: ``data-path``."""
    if DATA_PATH in node_config:
        refuse_simulation_only(job)
        return site_share(str(node_config[DATA_PATH]), job)
    if PARTITION_ID not in node_config:
        raise KeyError(
            f"node_config has neither 'partition-id' (simulation) nor 'data-path' (deployment); {NODE_CONFIG_HINT}"
        )
    num_partitions = int(node_config.get(NUM_PARTITIONS, job.num_clients))
    return client_share(job, int(node_config[PARTITION_ID]), num_partitions)
