"""Edge-case backdoor: Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor
Federated Learning" (NeurIPS 2020).

Inputs from the tail of the source class, labelled as the target class; see
:func:`edge_case_split` for how the tail is found in MedMNIST. The whole tail is held out from
every client's clean data; the attackers get their share of it back, relabelled, in attack
rounds, and the rest is the server's backdoor test set.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmed.logs import log
from fedmed.poisoning.backdoor import BackdoorTestSet
from fedmed.poisoning.base import (
    DataPoisoningConfig,
    Poison,
    PoisoningAttack,
    check_poison_fraction,
    check_source_and_target,
    poison_count,
    repeat_to,
)
from fedmed.seeds import Stream, seed_for

if TYPE_CHECKING:
    from fedmed.data import ClientShare
    from fedmed.dataset import ArrayDataset


@dataclass
class EdgeCaseConfig(DataPoisoningConfig):
    name: str = "edge_case"
    # on PneumoniaMNIST, source 1 -> target 0 makes unusual pneumonia images read as normal
    source_class: int = 1
    target_class: int = 0
    tail_fraction: float = 0.1  # share of the source class that forms the tail
    test_fraction: float = 0.5  # share of the tail held out as the backdoor test set
    # share of the attacker's pool that is poisoned: the paper's attacker mixes about 100
    # edge-case images with 400 clean ones
    poison_fraction: float = 0.2

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        super().check(num_classes, num_clients)
        check_source_and_target(self.name, self.source_class, self.target_class, num_classes)
        if not 0.0 < float(self.tail_fraction) <= 1.0:
            raise ValueError(f"attack.tail_fraction={self.tail_fraction} must be in (0, 1]")
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ValueError(
                f"attack.test_fraction={self.test_fraction} must be in (0, 1): the tail is split "
                "between the attackers and the backdoor test set"
            )
        check_poison_fraction(self.poison_fraction)


@dataclass(frozen=True)
class EdgeCaseSplit:
    """Train-split indices of the source class's tail: ``attacker`` (what malicious clients hold,
    relabelled to the target class when they attack) and ``test`` (held out: the backdoor test
    set). Both are removed from every client's clean train and validation indices."""

    attacker: np.ndarray
    test: np.ndarray

    @property
    def held_out(self) -> np.ndarray:
        return np.sort(np.concatenate([self.attacker, self.test]))


_EDGE_CACHE: OrderedDict = OrderedDict()
_EDGE_CACHE_SIZE = 4


def _fingerprint(array: np.ndarray, max_rows: int = 256) -> tuple:
    """Cheap identity of a (possibly memory-mapped, large) array: shape, dtype and a CRC of up
    to ``max_rows`` evenly spaced rows."""
    rows = np.linspace(0, len(array) - 1, num=min(max_rows, len(array)), dtype=np.int64) if len(array) else []
    sample = np.ascontiguousarray(array[rows]) if len(array) else np.zeros(0)
    return (tuple(array.shape), str(array.dtype), zlib.crc32(sample.tobytes()))


def _features(images: np.ndarray, rows: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Float pixels in [0, 1], flattened; images larger than 28 px are average-pooled by an
    integer factor first (64 -> 32, 128 -> 32, 224 -> 28), so a large file costs no more than
    a small one and the tail is judged on the image's coarse content."""
    size = int(images.shape[1])
    factor = max(1, size // 28)
    keep = (size // factor) * factor
    out = []
    for start in range(0, len(rows), chunk):
        x = np.asarray(images[rows[start : start + chunk]], dtype=np.float32)[:, :keep, :keep, :] / 255.0
        if factor > 1:
            n, _, _, c = x.shape
            x = x.reshape(n, keep // factor, factor, keep // factor, factor, c).mean(axis=(2, 4))
        out.append(x.reshape(len(x), -1))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def tail_distances(
    images: np.ndarray, labels: np.ndarray, source_class: int, seed: int, *, components: int = 32, max_fit: int = 4000
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)``: every source-class image and its distance from the class centre
    in a PCA space fitted on the *other* classes (see :func:`edge_case_split`).

    PCA (``components``, whitened, seeded) is fitted on up to ``max_fit`` seeded non-source
    images; the distance is the Euclidean norm, in those whitened coordinates, of an image's
    offset from the source images' mean there (Mahalanobis distance under the rest of the
    data's covariance, restricted to its main directions).
    """
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels).reshape(-1)
    source = np.flatnonzero(labels == source_class)
    rest = np.flatnonzero(labels != source_class)
    if len(source) < 2:
        raise ValueError(
            f"attack.source_class={source_class} has {len(source)} training images; an edge-case tail needs at least 2"
        )
    if len(rest) < 3:
        raise ValueError(
            "the edge-case feature space is fitted on the classes other than "
            f"attack.source_class={source_class}, which have {len(rest)} training images"
        )
    rng = np.random.default_rng(seed_for(seed, Stream.EDGE_CASE, 1))
    if len(rest) > max_fit:
        rest = np.sort(rng.choice(rest, size=max_fit, replace=False))
    fit = _features(images, rest)
    n_components = int(min(components, len(rest) - 1, fit.shape[1]))
    pca = PCA(
        n_components=n_components,
        whiten=True,
        svd_solver="randomized",
        random_state=int(seed_for(seed, Stream.EDGE_CASE, 2) % (2**32)),
    )
    # one BLAS thread: on a busy machine (Ray actors on every core) two threads made this
    # 0.1 s fit take 2 to 10 s; the matrices are too small to gain from more
    with threadpool_limits(1):
        pca.fit(fit)
        z = pca.transform(_features(images, source)).astype(np.float64)
    distances = np.linalg.norm(z - z.mean(axis=0), axis=1)
    return source, distances


def edge_case_split(
    images: np.ndarray,
    labels: np.ndarray,
    source_class: int,
    tail_fraction: float = 0.1,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> EdgeCaseSplit:
    """The edge-case inputs of Wang et al. (2020) among the train split: the ``tail_fraction``
    of source-class images farthest from the class centre, split (seeded) into the attackers'
    share and a held-out backdoor test set (``test_fraction`` of the tail).

    Why this tail: an edge-case input is a valid member of its class that the rest of the data
    does not explain, and so lies where the model has seen almost nothing (the paper's Southwest
    airliners among CIFAR-10's planes, Ardis sevens among EMNIST's). The paper picks such a set by
    hand or with ImageNet features; neither is available offline here, and MedMNIST's labels
    name no rare subgroup (no scanner, site or demographic tags) to choose one by. So the tail is
    measured: PCA is fitted on the other classes' images (raw pixels, average-pooled to at most
    32 px), and source-class images far from their class centre in its whitened coordinates
    (:func:`tail_distances`) are ones the dataset's main modes of variation do not account for.

    Returns train-split indices; the same arguments always give the same split, and the result
    is cached per process (every virtual client of a Ray worker and the server share it).
    """
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"attack.tail_fraction={tail_fraction} must be in (0, 1]")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"attack.test_fraction={test_fraction} must be in (0, 1)")
    labels = np.asarray(labels).reshape(-1)
    key = (
        _fingerprint(images),
        zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes()),
        int(source_class),
        float(tail_fraction),
        float(test_fraction),
        int(seed),
    )
    if key in _EDGE_CACHE:
        _EDGE_CACHE.move_to_end(key)
        return _EDGE_CACHE[key]
    source, distances = tail_distances(images, labels, source_class, seed)
    count = min(len(source), max(2, int(math.floor(tail_fraction * len(source) + 0.5))))
    order = np.argsort(-distances, kind="stable")
    tail = source[order[:count]]
    rng = np.random.default_rng(seed_for(seed, Stream.EDGE_CASE, 3))
    shuffled = rng.permutation(tail)
    n_test = min(count - 1, max(1, int(math.floor(test_fraction * count + 0.5))))
    split = EdgeCaseSplit(
        attacker=np.sort(shuffled[n_test:]).astype(np.int64), test=np.sort(shuffled[:n_test]).astype(np.int64)
    )
    _EDGE_CACHE[key] = split
    while len(_EDGE_CACHE) > _EDGE_CACHE_SIZE:
        _EDGE_CACHE.popitem(last=False)
    return split


def edge_share(split: EdgeCaseSplit, malicious: list[int], partition_id: int) -> np.ndarray:
    """The attacker set divided among the malicious partitions (in id order); this one's part."""
    if partition_id not in malicious:
        return np.zeros(0, dtype=np.int64)
    return np.array_split(split.attacker, len(malicious))[malicious.index(partition_id)]


def split_for(config: EdgeCaseConfig, images: np.ndarray, labels: np.ndarray, seed: int) -> EdgeCaseSplit:
    """:func:`edge_case_split` with the config's settings and the run's ``seed``."""
    return edge_case_split(
        images, labels, int(config.source_class), float(config.tail_fraction), float(config.test_fraction), seed
    )


def poison(
    config: EdgeCaseConfig,
    share: ClientShare,
    *,
    partition_id: int,
    malicious: list[int],
    rng: np.random.Generator,
    run_seed: int,
) -> Poison:
    """The attacker's share of the edge-case set (:func:`edge_share`), labelled as the target and
    repeated (whole copies, then a seeded sample) until it forms ``attack.poison_fraction`` of the
    pool."""
    clean = np.asarray(share.train_indices, dtype=np.int64)
    mine = edge_share(split_for(config, share.images, share.labels, run_seed), malicious, partition_id)
    if len(mine) == 0:
        log.warning(
            "partition %d: no edge-case images left for it (%d malicious partitions share the attacker "
            "set); it trains on clean data",
            partition_id,
            len(malicious),
        )
    added = repeat_to(mine, poison_count(len(clean), float(config.poison_fraction)), rng)
    return Poison(np.asarray(share.labels, dtype=np.int64)[clean], added)


def backdoor_test_set(config: EdgeCaseConfig, dataset: ArrayDataset, seed: int) -> BackdoorTestSet:
    """The held-out part of the source class's tail (train split, never seen by any client);
    true labels are the source class."""
    split = split_for(config, dataset.train.images, dataset.train.labels, seed)
    return BackdoorTestSet(
        np.ascontiguousarray(dataset.train.images[split.test]),
        np.asarray(dataset.train.labels[split.test], dtype=np.int64),
        int(config.target_class),
    )


def held_out(config: EdgeCaseConfig, images: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    return split_for(config, images, labels, seed).held_out


ATTACK = PoisoningAttack(
    "edge_case", EdgeCaseConfig, poison=poison, backdoor_test_set=backdoor_test_set, held_out=held_out
)
