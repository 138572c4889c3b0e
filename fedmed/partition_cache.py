"""Cut partitions kept on disk, so a run after the first skips flwr-datasets.

Importing flwr-datasets (with Hugging Face ``datasets``, pandas, seaborn and SciPy's statistics)
costs the driver seconds of CPU before its first round (README, "Fixed costs"), for a split that
depends only on the labels and a few values. The split is written once to
``<cache>/partitions/<key>.npy`` (``$FEDMED_CACHE``, else ``~/.cache/fedmed``, beside the
extracted MedMNIST arrays) and read back by later runs. The key covers everything that decides
the split: the labels' bytes, the number of clients, the method and its values, the seed, the
flwr-datasets version and the source of ``fedmed/partition.py``, so a changed library or
partitioning code cuts afresh.

The file has ``fedmed.data.write_partitions``' layout. A cached file that cannot be read, or
does not hold a disjoint and complete split of the labels, is cut again and replaced; a cache
folder that cannot be written only costs the next run the time.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

import numpy as np

from fedmed.logs import log

PARTITION_CODE = Path(__file__).with_name("partition.py")


def partition_key(labels: np.ndarray, num_clients: int, method: str, seed: int, alpha: float, min_size: int) -> str:
    """Hex digest naming one split: every input of ``partition_indices`` and the code that cuts it."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(repr((num_clients, method, seed, float(alpha), min_size)).encode())
    digest.update(metadata.version("flwr-datasets").encode())
    digest.update(PARTITION_CODE.read_bytes())
    return digest.hexdigest()[:32]


def read_cached(path: Path, num_labels: int, num_clients: int) -> list[np.ndarray] | None:
    """The split in ``path``, or None when it is missing, unreadable or not a disjoint, complete
    split of ``num_labels`` labels among ``num_clients`` clients."""
    try:
        table = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("fedmed: ignoring the unreadable partition cache %s (%s); cutting the split again", path, error)
        return None
    if table.dtype != np.int64 or table.ndim != 1 or len(table) != 2 + num_clients + num_labels:
        log.warning("fedmed: ignoring the partition cache %s: not a split of this dataset", path)
        return None
    offsets = table[1 : 2 + num_clients]
    indices = table[2 + num_clients :]
    complete = int(table[0]) == num_clients and offsets[0] == 0 and offsets[-1] == num_labels
    if not complete or np.any(np.diff(offsets) < 0) or not np.array_equal(np.sort(indices), np.arange(num_labels)):
        log.warning("fedmed: ignoring the partition cache %s: not a split of this dataset", path)
        return None
    return [indices[start:end].copy() for start, end in zip(offsets[:-1], offsets[1:])]
