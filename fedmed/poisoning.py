"""Malicious clients: who they are, when they attack, and the backdoor data they use.

Pure data and configuration logic, shared by the server (ground truth for scoring detection,
the backdoor test set behind ``backdoor/asr``) and the clients (what an attacker trains on,
clients/malicious.py). No Flower here.

Attacks (``attack=``), each with the paper it follows:

- ``edge_case``: Wang et al., "Attack of the Tails: Yes, You Really Can Backdoor Federated
  Learning" (NeurIPS 2020). Inputs from the tail of the source class, labelled as the target
  class; see :func:`edge_case_split` for how the tail is found in MedMNIST.
- ``badnets``: Gu et al., "BadNets" (2017): a small white square in the bottom-right corner
  makes any image read as the target class.
- ``label_flip``: Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems"
  (ESORICS 2020): the attacker's source-class images are labelled as the target class.
- ``sign_flip`` and ``gaussian``: untargeted Byzantine baselines (Blanchard et al. 2017,
  Fang et al. 2020): the negated honest update, or Gaussian noise, is sent.

The data-poisoning attacks (the first three) run in one of three modes (``attack.mode``):
``blackbox`` (plain training on the poisoned data), ``pgd`` (the model is kept within an L2
ball of radius ``attack.eps`` around the received global weights) and ``replacement`` (pgd,
then the update is scaled up to replace the global model; Bagdasaryan et al. 2020).

Malicious clients behave honestly before ``attack.start_round`` and between attack rounds, so
that attacks hit a model that has learned, as in the literature.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmed.dataset import ArrayDataset
from fedmed.seeds import Stream, seed_for
from fedmed.train import BatchTransform, predict_probs

__all__ = [
    "ATTACKS",
    "ATTACK_MODES",
    "DATA_POISONING",
    "MODEL_POISONING",
    "BackdoorTestSet",
    "EdgeCaseSplit",
    "add_trigger",
    "add_trigger_uint8",
    "attack_section",
    "attacks_in_round",
    "attacks_now",
    "backdoor_asr",
    "backdoor_test_set",
    "check_attack",
    "edge_case_for",
    "edge_case_split",
    "edge_share",
    "held_out_indices",
    "malicious_ids",
    "malicious_partitions",
    "tail_distances",
    "trigger_pixels",
    "update_scale",
]

ATTACKS = ("none", "edge_case", "badnets", "label_flip", "sign_flip", "gaussian")
ATTACK_MODES = ("blackbox", "pgd", "replacement")
DATA_POISONING = ("edge_case", "badnets", "label_flip")  # targeted: they have a backdoor test set
MODEL_POISONING = ("sign_flip", "gaussian")  # untargeted: they only degrade the global model
# the two classes matter (source != target) for these
_SOURCE_TARGET = ("edge_case", "label_flip")


def attack_section(attack: Mapping | None) -> dict:
    """The ``attack`` section as a plain dict, every key of ``AttackConfig`` present (a job from
    an older server, or none at all, reads as ``attack=none`` with the defaults)."""
    from omegaconf import DictConfig, OmegaConf

    from fedmed.config import AttackConfig

    if isinstance(attack, DictConfig):
        attack = OmegaConf.to_container(attack, resolve=True)
    section = dataclasses.asdict(AttackConfig())
    section.update(dict(attack or {}))
    return section


def check_no_attack_settings(attack: Mapping) -> None:
    """With ``attack=none`` every other ``attack.*`` key must keep its default: a setting that
    does nothing is refused before the run rather than silently ignored."""
    a = attack_section(attack)
    if a["name"] != "none":
        return
    defaults = attack_section(None)
    changed = [key for key, value in a.items() if key != "name" and value != defaults[key]]
    if changed:
        settings = ", ".join(f"attack.{key}={a[key]!r}" for key in changed)
        raise ValueError(
            f"{settings} has no effect with attack=none (all clients honest): choose an attack "
            f"(e.g. attack=edge_case) or drop the setting"
        )


def check_attack(attack: Mapping, num_classes: int | None = None, num_clients: int | None = None) -> None:
    """Refuse an attack configuration that cannot work, naming the key and what to do.

    ``attack`` is the ``attack`` section (a DictConfig or a plain dict, as clients get it);
    ``num_classes`` and ``num_clients``, where known, bound the classes and ``attack.ids``.
    """
    a = attack_section(attack)
    name, mode = a["name"], a["mode"]
    if name not in ATTACKS:
        raise ValueError(f"attack={name!r} is not known; use one of {', '.join(ATTACKS)}")
    if name == "none":
        return
    if mode not in ATTACK_MODES:
        raise ValueError(f"attack.mode={mode!r} is not known; use one of {', '.join(ATTACK_MODES)}")
    if name in MODEL_POISONING and mode != "blackbox":
        raise ValueError(
            f"attack.mode={mode} applies to the data-poisoning attacks ({', '.join(DATA_POISONING)}); "
            f"attack={name} sends its update directly: leave attack.mode=blackbox"
        )
    if not 0.0 <= float(a["fraction"]) <= 1.0:
        raise ValueError(f"attack.fraction={a['fraction']} must be in [0, 1] (share of malicious clients)")
    ids = a["ids"]
    if ids:
        if any(int(i) != i or i < 0 for i in ids):
            raise ValueError(f"attack.ids={list(ids)} must be partition ids >= 0")
        if len(set(ids)) != len(ids):
            raise ValueError(f"attack.ids={list(ids)} lists a partition twice")
        if num_clients is not None and max(ids) >= num_clients:
            raise ValueError(
                f"attack.ids={list(ids)} names a partition outside 0..{num_clients - 1} "
                f"(federation.num_clients={num_clients})"
            )
    elif float(a["fraction"]) == 0.0:
        raise ValueError(
            f"attack={name} with attack.fraction=0 and no attack.ids: no client would attack; "
            "set attack.fraction (e.g. 0.1) or attack.ids=[0]"
        )
    if int(a["frequency"]) < 1:
        raise ValueError(f"attack.frequency={a['frequency']} must be >= 1 (1: every round from attack.start_round)")
    if int(a["start_round"]) < 1:
        raise ValueError(f"attack.start_round={a['start_round']} must be >= 1 (rounds count from 1)")
    if float(a["eps"]) <= 0:
        raise ValueError(f"attack.eps={a['eps']} must be > 0 (L2 radius around the global weights)")
    if int(a["project_every"]) < 1:
        raise ValueError(f"attack.project_every={a['project_every']} must be >= 1 (optimizer steps)")
    if a["scale"] is not None and float(a["scale"]) <= 0:
        raise ValueError(f"attack.scale={a['scale']} must be > 0 (or null: 1, or the replacement factor)")
    for key in ("source_class", "target_class"):
        value = int(a[key])
        if value < 0 or (num_classes is not None and value >= num_classes):
            bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise ValueError(f"attack.{key}={value} is not a class of this dataset ({bound})")
    if name in _SOURCE_TARGET and int(a["source_class"]) == int(a["target_class"]):
        raise ValueError(
            f"attack.source_class and attack.target_class are both {a['source_class']}: "
            f"attack={name} relabels one class as another"
        )
    if name == "edge_case":
        if not 0.0 < float(a["tail_fraction"]) <= 1.0:
            raise ValueError(f"attack.tail_fraction={a['tail_fraction']} must be in (0, 1]")
        if not 0.0 < float(a["test_fraction"]) < 1.0:
            raise ValueError(
                f"attack.test_fraction={a['test_fraction']} must be in (0, 1): the tail is split "
                "between the attackers and the backdoor test set"
            )
    if name in ("edge_case", "badnets") and not 0.0 < float(a["poison_fraction"]) < 1.0:
        raise ValueError(
            f"attack.poison_fraction={a['poison_fraction']} must be in (0, 1) (share of the "
            "attacker's training pool that is poisoned)"
        )
    if name == "badnets" and int(a["trigger_size"]) < 1:
        raise ValueError(f"attack.trigger_size={a['trigger_size']} must be >= 1 (pixels at 28 px)")
    if name == "gaussian" and float(a["noise_std"]) <= 0:
        raise ValueError(f"attack.noise_std={a['noise_std']} must be > 0")


# --- who attacks, and when ---------------------------------------------------------------------


def malicious_partitions(num_clients: int, fraction: float, ids: list[int] | None, seed: int) -> list[int]:
    """The malicious partition ids, sorted.

    Explicit ``ids`` win (an empty list counts as unset); else a seeded sample of
    ``round(fraction * num_clients)`` partitions (half rounds up), at least one when
    ``fraction > 0``.
    """
    if ids:
        return sorted({int(i) for i in ids})
    if fraction <= 0 or num_clients < 1:
        return []
    count = min(num_clients, max(1, int(math.floor(fraction * num_clients + 0.5))))
    rng = np.random.default_rng(seed_for(seed, Stream.MALICIOUS_CLIENTS))
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))


def malicious_ids(attack: Mapping | None, num_clients: int, seed: int) -> list[int]:
    """:func:`malicious_partitions` for an ``attack`` section; ``[]`` for ``attack=none``.

    The runner's ground truth (detection TPR/FPR) and the clients' own decision both come from
    here, with the run's ``seed`` and ``federation.num_clients``.
    """
    a = attack_section(attack)
    if a["name"] == "none":
        return []
    return malicious_partitions(num_clients, float(a["fraction"]), a["ids"], seed)


def attacks_in_round(attack: Mapping, server_round: int) -> bool:
    """Whether malicious clients attack in ``server_round``: from ``start_round`` on, every
    ``frequency`` rounds. Before and between, they train honestly on their clean share."""
    a = attack_section(attack)
    if a["name"] == "none" or server_round < int(a["start_round"]):
        return False
    return (server_round - int(a["start_round"])) % int(a["frequency"]) == 0


def attacks_now(attack: Mapping, partition_id: int, num_clients: int, seed: int, server_round: int) -> bool:
    """Whether partition ``partition_id`` attacks in ``server_round``."""
    return attacks_in_round(attack, server_round) and partition_id in malicious_ids(attack, num_clients, seed)


def update_scale(
    attack: Mapping,
    *,
    num_train: int,
    num_clients: int,
    clients_per_round: int,
    attacker_examples: int,
    num_malicious: int = 1,
) -> float:
    """The factor the malicious update (local - global) is multiplied by before it is sent.

    ``attack.scale`` when set; else 1, except in ``replacement`` mode: the examples of a
    round's clients over the attackers' (Bagdasaryan et al. 2020, gamma = n / eta with FedAvg's
    example weights). The round's examples are estimated as ``clients_per_round * num_train /
    num_clients``; the attackers' as ``attacker_examples`` times the attackers expected in a
    round (``num_malicious * clients_per_round / num_clients``, at least one). The attackers
    collude and share the replacement: with two of them each scaled to replace the average
    alone, FedAvg would move twice as far and overshoot the attacker's model. With equal
    partitions and one attacker per round the factor is about ``clients_per_round``.
    """
    a = attack_section(attack)
    if a["scale"] is not None:
        return float(a["scale"])
    if a["mode"] != "replacement":
        return 1.0
    total = clients_per_round * num_train / max(num_clients, 1)
    attackers_per_round = max(1.0, num_malicious * clients_per_round / max(num_clients, 1))
    return float(total / (max(attacker_examples, 1) * attackers_per_round))


# --- edge-case inputs --------------------------------------------------------------------------


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


def edge_case_for(dataset: ArrayDataset, attack: Mapping, seed: int) -> EdgeCaseSplit:
    """:func:`edge_case_split` on ``dataset``'s train split with the ``attack`` section's settings."""
    a = attack_section(attack)
    return edge_case_split(
        dataset.train.images,
        dataset.train.labels,
        int(a["source_class"]),
        float(a["tail_fraction"]),
        float(a["test_fraction"]),
        seed,
    )


def held_out_indices(images: np.ndarray, labels: np.ndarray, attack: Mapping | None, seed: int) -> np.ndarray:
    """Train-split indices no client may hold as clean data: the whole edge-case tail under
    ``attack=edge_case`` (the attackers get their share back, relabelled, only when they
    attack); empty otherwise."""
    a = attack_section(attack)
    if a["name"] != "edge_case":
        return np.zeros(0, dtype=np.int64)
    return edge_case_split(
        images, labels, int(a["source_class"]), float(a["tail_fraction"]), float(a["test_fraction"]), seed
    ).held_out


def edge_share(split: EdgeCaseSplit, malicious: list[int], partition_id: int) -> np.ndarray:
    """The attacker set divided among the malicious partitions (in id order); this one's part."""
    if partition_id not in malicious:
        return np.zeros(0, dtype=np.int64)
    return np.array_split(split.attacker, len(malicious))[malicious.index(partition_id)]


# --- BadNets trigger ---------------------------------------------------------------------------


def trigger_pixels(image_size: int, trigger_size: int = 3) -> tuple[int, int]:
    """``(side, border)`` in pixels: ``trigger_size`` and 1 px at 28 px, scaled with the size."""
    factor = image_size / 28.0
    return max(1, int(round(trigger_size * factor))), max(1, int(round(factor)))


def _trigger_box(height: int, width: int, trigger_size: int) -> tuple[int, int, int]:
    side, border = trigger_pixels(min(height, width), trigger_size)
    outer = side + 2 * border
    if outer > min(height, width):
        raise ValueError(
            f"a {side} px trigger with its {border} px border does not fit a {height}x{width} image; "
            "lower attack.trigger_size"
        )
    return side, border, outer


def add_trigger(x: torch.Tensor, trigger_size: int = 3) -> torch.Tensor:
    """BadNets trigger on a float batch (N, C, H, W) in [0, 1]: a white square (``trigger_size``
    px at 28 px, scaled with the image) with a black border (1 px at 28 px) in the bottom-right
    corner. Returns a new tensor."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    side, border, outer = _trigger_box(height, width, trigger_size)
    out = x.clone()
    out[..., height - outer :, width - outer :] = 0.0
    out[..., height - border - side : height - border, width - border - side : width - border] = 1.0
    return out


def add_trigger_uint8(images: np.ndarray, trigger_size: int = 3) -> np.ndarray:
    """:func:`add_trigger` on stored uint8 images (N, H, W, C); returns a stamped copy."""
    height, width = int(images.shape[1]), int(images.shape[2])
    side, border, outer = _trigger_box(height, width, trigger_size)
    out = np.array(images, dtype=np.uint8, copy=True)
    out[:, height - outer :, width - outer :, :] = 0
    out[:, height - border - side : height - border, width - border - side : width - border, :] = 255
    return out


# --- the server's backdoor test set ------------------------------------------------------------


@dataclass(frozen=True)
class BackdoorTestSet:
    """Inputs a successful backdoor sends to ``target``: uint8 ``images`` (N, H, W, C), their
    true ``labels`` (never ``target``) and a batch ``transform`` to apply first, if any."""

    images: np.ndarray
    labels: np.ndarray
    target: int
    transform: BatchTransform | None = None

    def __len__(self) -> int:
        return int(len(self.labels))


def backdoor_test_set(dataset: ArrayDataset, attack: Mapping | None, seed: int) -> BackdoorTestSet | None:
    """The held-out inputs behind ``backdoor/asr`` for the ``attack`` section; None for attacks
    without a target (``none``, ``sign_flip``, ``gaussian``).

    - ``edge_case``: the held-out half of the source class's tail (train split, never seen by
      any client); true labels are the source class.
    - ``badnets``: test-split images whose label is not the target, with the trigger stamped.
    - ``label_flip``: test-split images of the source class.
    """
    a = attack_section(attack)
    name, target = a["name"], int(a["target_class"])
    if name not in DATA_POISONING:
        return None
    if name == "edge_case":
        split = edge_case_for(dataset, a, seed)
        images, labels = dataset.train.images[split.test], dataset.train.labels[split.test]
    elif name == "badnets":
        keep = np.flatnonzero(dataset.test.labels != target)
        images = add_trigger_uint8(dataset.test.images[keep], int(a["trigger_size"]))
        labels = dataset.test.labels[keep]
    else:
        keep = np.flatnonzero(dataset.test.labels == int(a["source_class"]))
        images, labels = dataset.test.images[keep], dataset.test.labels[keep]
    return BackdoorTestSet(np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), target)


def backdoor_asr(model: nn.Module, test_set: BackdoorTestSet, batch_size: int, device: torch.device) -> float:
    """Attack success rate: the share of ``test_set`` that ``model`` classifies as the target
    (NaN for an empty set)."""
    if len(test_set) == 0:
        return math.nan
    probs = predict_probs(
        model,
        test_set.images,
        np.arange(len(test_set)),
        batch_size=batch_size,
        device=device,
        transform=test_set.transform,
    )
    return float(np.mean(probs.argmax(axis=1) == test_set.target))
