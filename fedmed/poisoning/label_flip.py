"""Label flipping: Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems"
(ESORICS 2020). The attacker's source-class images are labelled as the target class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmed.poisoning.backdoor import BackdoorTestSet
from fedmed.poisoning.base import DataPoisoningConfig, Poison, PoisoningAttack, check_source_and_target

if TYPE_CHECKING:
    from fedmed.data import ClientShare
    from fedmed.dataset import ArrayDataset


@dataclass
class LabelFlipConfig(DataPoisoningConfig):
    name: str = "label_flip"
    # on PneumoniaMNIST: pneumonia -> normal
    source_class: int = 1
    target_class: int = 0

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        super().check(num_classes, num_clients)
        check_source_and_target(self.name, self.source_class, self.target_class, num_classes)


def poison(
    config: LabelFlipConfig,
    share: ClientShare,
    *,
    partition_id: int,
    malicious: list[int],
    rng: np.random.Generator,
    run_seed: int,
) -> Poison:
    """Nothing added: the attacker's source-class images are labelled as the target."""
    labels = np.asarray(share.labels, dtype=np.int64)[np.asarray(share.train_indices, dtype=np.int64)]
    flipped = np.where(labels == int(config.source_class), int(config.target_class), labels)
    return Poison(flipped, np.zeros(0, dtype=np.int64))


def backdoor_test_set(config: LabelFlipConfig, dataset: ArrayDataset, seed: int) -> BackdoorTestSet:
    """Test-split images of the source class."""
    keep = np.flatnonzero(dataset.test.labels == int(config.source_class))
    return BackdoorTestSet(
        np.ascontiguousarray(dataset.test.images[keep]),
        np.asarray(dataset.test.labels[keep], dtype=np.int64),
        int(config.target_class),
    )


ATTACK = PoisoningAttack("label_flip", LabelFlipConfig, poison=poison, backdoor_test_set=backdoor_test_set)
