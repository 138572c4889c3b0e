"""Split a training set among federated clients.

Each client holds a sorted int64 array of indices into the shared train arrays, never a
copy of the images (docs/architecture.md: many virtual clients must not mean many copies).

The assignment itself is done by flwr-datasets partitioners on a label-only table:

- ``iid`` and ``site``: ``IidPartitioner`` (``site`` adds a per-site appearance shift
  later, see ``fedmed.site_shift``; its indices are plain iid).
- ``dirichlet``: ``DirichletPartitioner`` (label skew with concentration ``alpha``).
- ``quantity``: ``SizePartitioner`` with sizes drawn here from a Dirichlet over clients
  (see ``_quantity_skew_sizes`` for why not Linear/Square/ExponentialPartitioner).

The table and plot of who holds what are in ``fedmed.partition_report``, which a run whose
split comes from the cache (``fedmed.partition_cache``) loads without this module.
"""

from __future__ import annotations

import math
import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    SizePartitioner,
)

METHODS = ("iid", "dirichlet", "quantity", "site")

# Partitioning is a few small in-memory tables; the progress bars would only add noise.
datasets.disable_progress_bars()


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Return one sorted int64 index array (into ``labels``) per client.

    ``alpha`` is the Dirichlet concentration for ``dirichlet`` (over each label's split
    among clients) and ``quantity`` (over client sizes): small alpha means strong skew.
    ``min_partition_size`` applies to ``dirichlet`` and ``quantity``; ``iid`` and
    ``site`` give every client len(labels) // num_partitions samples or one more.
    The result depends only on the arguments (deterministic from ``seed``).
    """
    labels = _check_inputs(labels, num_partitions, method, seed, alpha, min_partition_size)
    table = _shuffled_label_table(labels, seed)
    if method in ("iid", "site"):
        partitioner: Partitioner = IidPartitioner(num_partitions=num_partitions)
    elif method == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            # The balancing step of the original code (Yurochkin et al. 2019, also used by
            # NIID-Bench): a client already above the average size gets no more samples.
            # It keeps sizes comparable, so the skew is in the labels, not in the sizes.
            self_balancing=True,
            seed=seed,
        )
    else:  # quantity
        sizes = _quantity_skew_sizes(len(labels), num_partitions, alpha, min_partition_size, seed)
        partitioner = SizePartitioner(partition_sizes=sizes)
    partitioner.dataset = table
    partitions = _read_partitions(partitioner, num_partitions, alpha, min_partition_size)
    _check_disjoint_and_complete(partitions, len(labels), method)
    return partitions


def _check_inputs(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    seed: int,
    alpha: float,
    min_partition_size: int,
) -> np.ndarray:
    """Validate the arguments of ``partition_indices``; return the labels as int64."""
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; valid methods: {', '.join(METHODS)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}; "
            "flatten (N, 1) label arrays with labels.ravel()"
        )
    num_samples = len(labels)
    if not _is_int(num_partitions) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > num_samples:
        raise ValueError(
            f"num_partitions={num_partitions} is larger than the number of samples ({num_samples}); "
            "use fewer clients or a larger dataset"
        )
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(alpha, (int, float, np.number)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}; smaller alpha means more skew")
    if not _is_int(min_partition_size) or min_partition_size < 1:
        raise ValueError(
            f"min_partition_size must be an integer >= 1 (a client without data cannot train), "
            f"got {min_partition_size!r}"
        )
    if method in ("dirichlet", "quantity") and num_partitions * min_partition_size > num_samples:
        raise ValueError(
            f"{num_partitions} partitions of at least min_partition_size={min_partition_size} samples "
            f"need {num_partitions * min_partition_size} samples, but there are {num_samples}; "
            "lower min_partition_size or num_partitions"
        )
    return labels.astype(np.int64, copy=False)


def _is_int(value: object) -> bool:
    """True for Python and NumPy integers, False for bools (True is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shuffled_label_table(labels: np.ndarray, seed: int) -> datasets.Dataset:
    """A label-only table, rows in seeded random order, with each row's original index.

    IidPartitioner and SizePartitioner cut contiguous runs of rows, so the rows must be
    shuffled first (FederatedDataset does the same with ``Dataset.shuffle(seed)``). We
    permute here with the same NumPy call instead: ``Dataset.shuffle`` adds an indices
    mapping that makes every later column read row by row, several times slower.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    return datasets.Dataset.from_dict({"label": labels[order], "idx": order})


def _quantity_skew_sizes(
    num_samples: int, num_partitions: int, alpha: float, min_partition_size: int, seed: int
) -> list[int]:
    """Client sizes for quantity skew: min_partition_size each, the rest split by Dir(alpha).

    Written here because flwr-datasets' size partitioners do not fit: Linear, Square and
    ExponentialPartitioner fix the sizes from the client id (proportional to id, id^2,
    e^id) with no strength knob and no minimum size; Exponential leaves clients empty
    beyond about 10 partitions, Linear gives the smallest client 2N/(M(M+1)) samples
    (zero for small sets). A Dirichlet over clients (the quantity skew of NIID-Bench,
    Li et al. 2022) is tuned by alpha and respects min_partition_size;
    SizePartitioner then assigns the samples.
    """
    # A stream separate from the row shuffle, both derived from the one seed.
    rng = np.random.default_rng([seed, 1])
    shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
    spare = num_samples - num_partitions * min_partition_size
    extra = rng.multinomial(spare, shares)
    return [int(size) for size in min_partition_size + extra]


def _read_partitions(
    partitioner: Partitioner, num_partitions: int, alpha: float, min_partition_size: int
) -> list[np.ndarray]:
    """Ask the partitioner for every partition and return their sorted original indices."""
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on every resampling when a client falls below
            # min_partition_size; an outright failure is reported below instead.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            # At tiny alpha, self-balancing can leave a class with all-zero shares: the
            # partitioner then divides 0/0 and silently gives the whole class to the last
            # client. Stop on NumPy's warning rather than return that biased split.
            warnings.filterwarnings("error", message="invalid value encountered", category=RuntimeWarning)
            tables = [partitioner.load_partition(pid) for pid in range(num_partitions)]
    except RuntimeWarning as err:
        raise ValueError(
            f"dirichlet partitioning at alpha={alpha} gave some label a zero share on every "
            f"client that could still take samples (num_partitions={num_partitions}, "
            f"NumPy: {err}); raise alpha"
        ) from err
    except ValueError as err:
        if isinstance(partitioner, DirichletPartitioner):
            raise ValueError(
                f"dirichlet partitioning found no split giving every one of num_partitions="
                f"{num_partitions} clients at least min_partition_size={min_partition_size} samples "
                f"at alpha={alpha} (flwr-datasets gave up after its retries: {err}); "
                "raise alpha, lower min_partition_size or use fewer partitions"
            ) from err
        raise
    # Read the column as one Arrow array: iterating a datasets Column goes row by row.
    return [np.sort(table.with_format("arrow")["idx"][:].to_numpy()).astype(np.int64) for table in tables]


def _check_disjoint_and_complete(partitions: list[np.ndarray], num_samples: int, method: str) -> None:
    """Guard against a partitioner bug: no sample twice, and every method here covers all."""
    every_index = np.concatenate(partitions)
    times_used = np.bincount(every_index, minlength=num_samples)
    if times_used.max(initial=0) > 1:
        raise RuntimeError(f"{method} partitioning put a sample in more than one partition; this is a bug")
    if len(every_index) != num_samples:
        raise RuntimeError(f"{method} partitioning assigned {len(every_index)} of {num_samples} samples; this is a bug")
