"""The server's backdoor test set behind ``backdoor/asr``, and the train rows no client holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmed.poisoning.registry import attack_config, attack_named

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fedmed.dataset import ArrayDataset
    from fedmed.poisoning.schedule import AttackSection
    from fedmed.train import BatchTransform


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


def backdoor_test_set(dataset: ArrayDataset, attack: AttackSection, seed: int) -> BackdoorTestSet | None:
    """The held-out inputs behind ``backdoor/asr`` for the ``attack`` section; None for attacks
    without a target (``none``, ``sign_flip``, ``gaussian``)."""
    config = attack_config(attack)
    build = attack_named(config.name).backdoor_test_set
    return None if build is None else build(config, dataset, seed)


def held_out_indices(images: np.ndarray, labels: np.ndarray, attack: AttackSection, seed: int) -> np.ndarray:
    """Train-split indices no client may hold as clean data (the edge-case tail: the attackers
    get their share back, relabelled, only when they attack); empty for most attacks."""
    config = attack_config(attack)
    held_out = attack_named(config.name).held_out
    return np.zeros(0, dtype=np.int64) if held_out is None else held_out(config, images, labels, seed)


def backdoor_asr(model: nn.Module, test_set: BackdoorTestSet, batch_size: int, device: torch.device) -> float:
    """Attack success rate: the share of ``test_set`` that ``model`` classifies as the target
    (NaN for an empty set)."""
    from fedmed.train import predict_probs

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
