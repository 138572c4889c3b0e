"""BadNets: Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain" (2017). A small white square with a black border in the bottom-right corner makes any
image read as the target class.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmed.poisoning.backdoor import BackdoorTestSet
from fedmed.poisoning.base import (
    DataPoisoningConfig,
    Poison,
    PoisoningAttack,
    check_poison_fraction,
    poison_count,
    repeat_to,
)

if TYPE_CHECKING:
    import torch

    from fedmed.data import ClientShare
    from fedmed.dataset import ArrayDataset


@dataclass
class BadNetsConfig(DataPoisoningConfig):
    name: str = "badnets"
    target_class: int = 0
    trigger_size: int = 3  # white square's side at 28 px (scaled with the image size)
    # share of the attacker's pool that is stamped (Bagdasaryan et al. 2020 poison ~20 of 64 per batch)
    poison_fraction: float = 0.3

    def check(self, num_classes: int | None = None, num_clients: int | None = None) -> None:
        super().check(num_classes, num_clients)
        check_poison_fraction(self.poison_fraction)
        if int(self.trigger_size) < 1:
            raise ValueError(f"attack.trigger_size={self.trigger_size} must be >= 1 (pixels at 28 px)")


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


def poison(
    config: BadNetsConfig,
    share: ClientShare,
    *,
    partition_id: int,
    malicious: list[int],
    rng: np.random.Generator,
    run_seed: int,
) -> Poison:
    """Stamped, target-labelled copies of a seeded draw of the attacker's own images whose label
    is not the target, forming ``attack.poison_fraction`` of the pool."""
    clean = np.asarray(share.train_indices, dtype=np.int64)
    labels = np.asarray(share.labels, dtype=np.int64)[clean]
    candidates = clean[labels != int(config.target_class)]
    added = repeat_to(candidates, poison_count(len(clean), float(config.poison_fraction)), rng)
    return Poison(labels, added, functools.partial(add_trigger_uint8, trigger_size=int(config.trigger_size)))


def backdoor_test_set(config: BadNetsConfig, dataset: ArrayDataset, seed: int) -> BackdoorTestSet:
    """Test-split images whose label is not the target, with the trigger stamped."""
    keep = np.flatnonzero(dataset.test.labels != int(config.target_class))
    return BackdoorTestSet(
        np.ascontiguousarray(add_trigger_uint8(dataset.test.images[keep], int(config.trigger_size))),
        np.asarray(dataset.test.labels[keep], dtype=np.int64),
        int(config.target_class),
    )


ATTACK = PoisoningAttack("badnets", BadNetsConfig, poison=poison, backdoor_test_set=backdoor_test_set)
