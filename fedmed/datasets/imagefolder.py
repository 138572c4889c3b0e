"""A hospital's own images (``fedmed.imagefolder``): one sub-folder per class, or train/, val/,
test/ folders each holding them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedmed.datasets.base import Dataset, DatasetConfig, check_at_least, check_channels, refuse


@dataclass
class ImageFolderConfig(DatasetConfig):
    name: str = "imagefolder"
    root: Optional[str] = None  # the image folder: required
    size: int = 64  # images are resized to size x size pixels
    channels: int = 3  # 1 (grey) or 3 (RGB)
    # shares of the images carved out for validation and test when there is no val/ or test/ folder
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def check(self) -> None:
        if not self.root:
            raise refuse(
                "root", self.root, "is required: set dataset.root=<folder with one sub-folder of images per class>"
            )
        check_at_least(self, ("size",), 1, " (pixels)")
        check_channels(self)
        for key in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, key) < 1:
                raise refuse(key, getattr(self, key), "must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise refuse(
                "val_fraction",
                self.val_fraction,
                f"+ dataset.test_fraction={self.test_fraction} must be below 1 to leave training images",
            )


def load(config: ImageFolderConfig, seed: int):
    from fedmed.imagefolder import load_imagefolder

    return load_imagefolder(
        config.root,
        size=config.size,
        channels=config.channels,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=seed,
    )


DATASETS = (Dataset("imagefolder", ImageFolderConfig, load),)
