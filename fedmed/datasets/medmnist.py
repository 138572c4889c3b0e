"""The MedMNIST v2 2D datasets (``fedmed.medmnist`` loads their official ``.npz`` files): one
option per single-label dataset, all sharing ``MedMNISTConfig``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from fedmed.datasets.base import Dataset, DatasetConfig, refuse
from fedmed.medmnist import SUPPORTED_NAMES, SUPPORTED_SIZES


@dataclass
class MedMNISTConfig(DatasetConfig):
    name: str = MISSING  # pneumoniamnist, breastmnist, ... (``dataset=<name>`` sets it)
    # folder with the .npz files; None: $FEDMED_DATA, else ~/.medmnist
    root: Optional[str] = None
    size: int = 28  # 28, 64, 128 or 224: the official files
    # refuse a file whose MD5 is not an official one (false: only warn)
    verify_md5: bool = True

    def check(self) -> None:
        if self.size not in SUPPORTED_SIZES:
            sizes = ", ".join(map(str, SUPPORTED_SIZES))
            raise refuse("size", self.size, f"is not a MedMNIST size; the official files come in {sizes}")


def load(config: MedMNISTConfig, seed: int):
    from fedmed.medmnist import load_medmnist

    return load_medmnist(config.name, size=config.size, root=config.root, verify_md5=config.verify_md5)


# ChestMNIST is multi-label; fedmed trains single-label classifiers, so it has no option
DATASETS = tuple(Dataset(name, MedMNISTConfig, load) for name in SUPPORTED_NAMES)
