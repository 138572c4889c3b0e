"""What every poisoning attack shares: the bases of its structured config, the record that
registers it, and what a data-poisoning attack hands the attacker's training.

Kept free of torch at import: ``fedmed-sim`` composes and checks its configuration, attacks
included, before it imports torch. An attack's torch code runs inside its functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from omegaconf import MISSING

if TYPE_CHECKING:
    from fedmed.dataset import ArrayDataset
    from fedmed.poisoning.backdoor import BackdoorTestSet

# data-poisoning attacks only: plain training, training projected onto an L2 ball around the
# global weights (Wang et al. 2020), or projected and then scaled up (Bagdasaryan et al. 2020)
ATTACK_MODES = ("blackbox", "pgd", "replacement")


@dataclass
class AttackConfig:
    """Base of every attack's structured config; ``attack=<name>`` picks the option."""

    name: str = MISSING

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        """Refuse settings that cannot work, naming the key (``attack.<key>``) and what to do.
        ``num_classes`` and ``num_clients``, where known, bound the classes and ``attack.ids``."""


@dataclass
class MaliciousClientsConfig(AttackConfig):
    """Who attacks and when: the keys of every attack."""

    fraction: float = 0.1  # share of the partitions that are malicious (at least one when > 0)
    ids: Optional[list[int]] = None  # explicit malicious partition ids; win over `fraction`
    frequency: int = 1  # attack every `frequency` rounds from `start_round` on
    # before it, malicious clients train honestly, so that attacks hit a model that has learned
    start_round: int = 3
    # the malicious update (local - global) is multiplied by it before it is sent. None: 1, or in
    # `replacement` mode the examples of a round over the attacker's (Bagdasaryan et al. 2020)
    scale: Optional[float] = None

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        if not 0.0 <= float(self.fraction) <= 1.0:
            raise ValueError(f"attack.fraction={self.fraction} must be in [0, 1] (share of malicious clients)")
        ids = self.ids
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
        elif float(self.fraction) == 0.0:
            raise ValueError(
                f"attack={self.name} with attack.fraction=0 and no attack.ids: no client would attack; "
                "set attack.fraction (e.g. 0.1) or attack.ids=[0]"
            )
        if int(self.frequency) < 1:
            raise ValueError(f"attack.frequency={self.frequency} must be >= 1 (1: every round from attack.start_round)")
        if int(self.start_round) < 1:
            raise ValueError(f"attack.start_round={self.start_round} must be >= 1 (rounds count from 1)")
        if self.scale is not None and float(self.scale) <= 0:
            raise ValueError(f"attack.scale={self.scale} must be > 0 (or null: 1, or the replacement factor)")


@dataclass
class DataPoisoningConfig(MaliciousClientsConfig):
    """A targeted attack that trains on poisoned data: the target class and how the attacker
    keeps its model close to the global one."""

    target_class: int = 0
    mode: str = "blackbox"  # blackbox | pgd | replacement
    # pgd / replacement: L2 radius, over all float parameters, of the ball around the received
    # global weights that the attacker's model is projected onto. Choose it near the honest update
    # norms of the run (they grow with the model's size and the learning rate), so that a
    # projected update is no longer than a typical honest one; the README gives measured norms.
    eps: float = 2.0
    project_every: int = 10  # pgd: project every this many optimizer steps (and once at the end)

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        super().check(num_classes, num_clients)
        if self.mode not in ATTACK_MODES:
            raise ValueError(f"attack.mode={self.mode!r} is not known; use one of {', '.join(ATTACK_MODES)}")
        if float(self.eps) <= 0:
            raise ValueError(f"attack.eps={self.eps} must be > 0 (L2 radius around the global weights)")
        if int(self.project_every) < 1:
            raise ValueError(f"attack.project_every={self.project_every} must be >= 1 (optimizer steps)")
        check_class("target_class", self.target_class, num_classes)


def check_class(key: str, value: int, num_classes: int | None) -> None:
    if int(value) < 0 or (num_classes is not None and int(value) >= num_classes):
        bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ValueError(f"attack.{key}={value} is not a class of this dataset ({bound})")


def check_source_and_target(name: str, source_class: int, target_class: int, num_classes: int | None) -> None:
    check_class("source_class", source_class, num_classes)
    if int(source_class) == int(target_class):
        raise ValueError(
            f"attack.source_class and attack.target_class are both {source_class}: "
            f"attack={name} relabels one class as another"
        )


def check_poison_fraction(value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"attack.poison_fraction={value} must be in (0, 1) (share of the attacker's training pool that is poisoned)"
        )


@dataclass
class Poison:
    """What a data-poisoning attack does to the attacker's clean training rows in an attack round."""

    clean_labels: np.ndarray  # labels of the clean rows, relabelled where the attack does so
    added_rows: np.ndarray  # rows of the share added to the pool, all labelled as the target class
    # applied to the added rows' uint8 images (N, H, W, C) when a batch is drawn (BadNets' trigger)
    stamp: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class PoisoningAttack:
    """A registered attack: its config name, its structured config, and what it does.

    Exactly one of ``poison`` and ``update`` is set:

    - ``poison(config, share, *, partition_id, malicious, rng, run_seed) -> Poison``: a
      data-poisoning attack; the attacker trains on its clean rows plus what this returns.
    - ``update(config, trained, reference, *, seed, scale) -> list[Tensor]``: a model-poisoning
      attack; the attacker trains honestly and sends ``reference + update`` instead.

    ``backdoor_test_set(config, dataset, seed)``: a targeted attack's held-out inputs behind
    ``backdoor/asr``. ``held_out(config, images, labels, seed)``: train-split rows no client may
    hold as clean data (the edge-case tail).
    """

    name: str
    config: type[AttackConfig]
    poison: Callable[..., Poison] | None = None
    update: Callable[..., list] | None = None
    backdoor_test_set: Callable[[Any, ArrayDataset, int], BackdoorTestSet] | None = None
    held_out: Callable[[Any, np.ndarray, np.ndarray, int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.name != "none" and (self.poison is None) == (self.update is None):
            raise ValueError(f"attack {self.name!r}: set exactly one of poison (data) and update (model)")

    @property
    def poisons_data(self) -> bool:
        return self.poison is not None


def poison_count(clean: int, poison_fraction: float) -> int:
    """Poisoned rows added to ``clean`` clean ones so that they form ``poison_fraction`` of the pool."""
    return int(round(clean * poison_fraction / (1.0 - poison_fraction)))


def repeat_to(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` rows drawn from ``rows``: whole copies, then a seeded sample of the remainder."""
    if count <= 0 or len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    whole, rest = divmod(count, len(rows))
    return np.concatenate([np.tile(rows, whole), rng.choice(rows, size=rest, replace=False)]).astype(np.int64)
