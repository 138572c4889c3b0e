"""From configuration to arrays: which dataset, and which share of it a client holds.

Results are cached per process, so a Ray worker that plays many virtual clients loads the
dataset once and every client holds only index arrays into it. In ``fedmed-sim`` the server cuts
the partitions once and writes them beside the shared model files (``write_partitions``): a
client then reads only its own slice and never loads flwr-datasets (190 MB in each Ray worker).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmed.dataset import ArrayDataset
from fedmed.datasets import DatasetConfig, dataset_config, dataset_named
from fedmed.logs import log
from fedmed.medmnist import resolve_cache_dir
from fedmed.partition_cache import partition_key, read_cached
from fedmed.poisoning import held_out_indices
from fedmed.seeds import Stream, seed_for
from fedmed.site_data import FederationShape, read_site
from fedmed.site_shift import SiteShift, site_shift

if TYPE_CHECKING:
    from fedmed.job import Job


def load_dataset(name: str, *, seed: int, **options) -> ArrayDataset:
    """Dataset option ``name`` (``synthetic``, ``imagefolder``, a MedMNIST 2D name: the registry
    in ``fedmed.datasets``) with its config keys ``options`` (``dataset.<key>``; a key the option
    does not have is refused). ``seed`` fixes what it draws. Cached per process."""
    return load_config(dataset_config({"name": name, **options}), seed)


def load_config(config: DatasetConfig, seed: int) -> ArrayDataset:
    """The dataset of a typed config (``fedmed.datasets.dataset_config``). Cached per process,
    keyed by the config's values: a Ray worker playing many clients loads it once."""
    return _load(config.name, tuple(dataclasses.asdict(config).items()), seed)


@functools.lru_cache(maxsize=4)
def _load(name: str, values: tuple[tuple[str, object], ...], seed: int) -> ArrayDataset:
    dataset = dataset_named(name)
    return dataset.load(dataset.config(**dict(values)), seed)


def dataset_from_config(dataset_cfg: Mapping, seed: int) -> ArrayDataset:
    """The dataset of the configuration's ``dataset`` section (a DictConfig, or the plain dict a
    client gets in its job), typed and checked by its option; what it draws (generated images,
    an image folder's split) comes from the run's ``DATASET`` stream."""
    return load_config(dataset_config(dataset_cfg), seed_for(seed, Stream.DATASET))


@dataclass(frozen=True)
class ClientShare:
    """What one client trains and validates on: indices into shared arrays, plus its site shift."""

    images: np.ndarray
    labels: np.ndarray
    train_indices: np.ndarray
    val_indices: np.ndarray
    num_classes: int
    site_shift: SiteShift | None


@functools.lru_cache(maxsize=2)
def _partitions(
    dataset_name: str,
    labels_bytes: bytes,
    num_clients: int,
    method: str,
    seed: int,
    alpha: float,
    min_partition_size: int,
) -> list[np.ndarray]:
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    key = partition_key(labels, num_clients, method, seed, alpha, min_partition_size)
    cached = resolve_cache_dir(None) / "partitions" / f"{key}.npy"
    partitions = read_cached(cached, len(labels), num_clients)
    if partitions is not None:
        return partitions
    # imported here: Flower Datasets (and pandas, matplotlib) only where a simulated split is cut
    from fedmed.partition import partition_indices

    partitions = partition_indices(
        labels, num_clients, method, seed=seed, alpha=alpha, min_partition_size=min_partition_size
    )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_partitions(partitions, cached)
    except OSError as error:  # a cache that cannot be written only costs the next run the time
        log.debug("fedmed: partition cache %s not written: %s", cached, error)
    return partitions


def client_partitions(
    labels: np.ndarray, num_clients: int, partition_cfg: dict, seed: int, dataset_name: str = ""
) -> list[np.ndarray]:
    """Train-split indices of every client (deterministic from the run's ``seed``, through its
    ``DATA_SPLIT`` stream; cached per process).
    A split that cannot be made names the configuration keys that decide it."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    alpha, min_size = float(partition_cfg.get("alpha", 0.5)), int(partition_cfg.get("min_partition_size", 10))
    try:
        split_seed = seed_for(seed, Stream.DATA_SPLIT)
        return _partitions(
            dataset_name, labels.tobytes(), num_clients, partition_cfg["name"], split_seed, alpha, min_size
        )
    except ValueError as error:
        raise ValueError(
            f"partition={partition_cfg['name']} cannot split the {len(labels)} training images among "
            f"federation.num_clients={num_clients} clients (partition.alpha={alpha:g}, "
            f"partition.min_partition_size={min_size}): {error}"
        ) from None


def write_partitions(partitions: list[np.ndarray], path: Path) -> Path:
    """Every client's indices in one int64 ``.npy``: [count, count + 1 offsets, indices...],
    so that a client memory-maps it and reads its own slice only (``read_partition``)."""
    sizes = np.array([len(p) for p in partitions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    table = np.concatenate([[len(partitions)], offsets, *partitions]).astype(np.int64)
    # a name of its own: runs writing the same cached split at once must not share a partial file
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".partial", delete=False) as partial:
        try:
            np.save(partial, table)
        except BaseException:
            os.unlink(partial.name)
            raise
    os.replace(partial.name, path)  # a client never reads half a file
    return path


def read_partition(path: str | Path, partition_id: int, num_partitions: int) -> np.ndarray:
    """Partition ``partition_id``'s indices from ``write_partitions``' file (a copy of its slice)."""
    table = np.load(path, mmap_mode="r", allow_pickle=False)
    count = int(table[0])
    if count != num_partitions:
        raise ValueError(f"{path} holds {count} partitions, not num-partitions={num_partitions}")
    _check_partition_id(partition_id, count)
    start, end = (int(v) for v in table[1 + partition_id : 3 + partition_id])
    return np.array(table[2 + count + start : 2 + count + end])


def _check_partition_id(partition_id: int, count: int) -> None:
    if not 0 <= partition_id < count:
        raise ValueError(f"partition-id {partition_id} outside 0..{count - 1}")


def partition_of(job: Job, dataset: ArrayDataset, partition_id: int, num_partitions: int) -> np.ndarray:
    """One client's train-split indices: from the server's file when the job names one, else cut
    here (every partition at once, cached: the partitioners assign all clients together)."""
    if job.partitions_file:
        return read_partition(job.partitions_file, partition_id, num_partitions)
    partition = dataclasses.asdict(job.partition)
    partitions = client_partitions(dataset.train.labels, num_partitions, partition, job.seed, dataset.name)
    _check_partition_id(partition_id, len(partitions))
    return partitions[partition_id]


def split_holdout(indices: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of one client's indices into local train and local validation."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(indices)
    n_val = int(round(len(indices) * val_fraction))
    if val_fraction > 0 and len(indices) >= 4:
        n_val = max(n_val, 1)
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def client_share(job: Job, partition_id: int, num_partitions: int) -> ClientShare:
    """The share of partition ``partition_id`` in a simulated federation described by ``job``."""
    seed = job.seed
    dataset = dataset_from_config(job.dataset, seed)
    train_idx, val_idx = split_holdout(
        partition_of(job, dataset, partition_id, num_partitions),
        job.client.val_fraction,
        seed_for(seed, Stream.HOLDOUT, partition_id),
    )
    # attack=edge_case: the source class's tail is held out from every client's clean data (the
    # attackers get their share back, relabelled, only in attack rounds: clients/malicious.py)
    held_out = held_out_indices(dataset.train.images, dataset.train.labels, job.attack, seed)
    if len(held_out):
        train_idx = train_idx[~np.isin(train_idx, held_out)]
        val_idx = val_idx[~np.isin(val_idx, held_out)]
    shift = None
    if job.partition.name == "site":
        shift = site_shift(partition_id, seed_for(seed, Stream.SITE_SHIFT), job.partition.site_strength)
    return ClientShare(dataset.train.images, dataset.train.labels, train_idx, val_idx, dataset.num_classes, shift)


def site_share(data_path: str, job: Job) -> ClientShare:
    """A deployed hospital's own data (a MedMNIST-layout ``.npz`` or an image folder), checked
    against the federation's classes, channels and image size (``fedmed.site_data``)."""
    shape = FederationShape.from_job(job)
    train, val = read_site(Path(data_path).expanduser(), shape, job.seed)
    images = np.concatenate([train.images, val.images])
    labels = np.concatenate([train.labels, val.labels])
    n = len(train)
    return ClientShare(images, labels, np.arange(n), np.arange(n, len(labels)), shape.num_classes, None)
