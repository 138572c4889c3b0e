"""A deployed site's own data, read and checked against the federation before any training.

A site holds a MedMNIST-layout ``.npz`` (``train_images``, ``train_labels``, ``val_images``,
``val_labels``; what ``fedmed-sites`` writes) or an image folder (``fedmed.imagefolder``). Every
problem is one ``SiteDataError`` naming the file, the key and what the federation expects, so a
site with black images, the wrong channels or out-of-range labels fails before it trains.
Nothing here unpickles: archives are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmed.dataset import Split
from fedmed.logs import log

if TYPE_CHECKING:
    from fedmed.job import Job

SITE_KEYS = ("train_images", "train_labels", "val_images", "val_labels")
LAYOUT_HINT = (
    "a MedMNIST-layout .npz: uint8 train_images/val_images (N, H, W) or (N, H, W, C) and integer "
    "train_labels/val_labels (N,) or (N, 1); fedmed-sites writes such files"
)


class SiteDataError(ValueError):
    """A site's data does not fit the federation; the message says which file, key and why."""


@dataclass(frozen=True)
class FederationShape:
    """What every site's images and labels must match: the server's model and test split."""

    num_classes: int
    channels: int
    image_size: int

    @classmethod
    def from_job(cls, job: Job) -> FederationShape:
        missing = [key for key in ("num_classes", "channels", "image_size") if getattr(job, key) is None]
        if missing:
            raise KeyError(
                f"the server's job lacks {', '.join(missing)}: the server runs an older fedmed than "
                "this site; run the same version on both"
            )
        return cls(job.num_classes, job.channels, job.image_size)


def read_site(path: Path, shape: FederationShape, seed: int) -> tuple[Split, Split]:
    """The site's train and validation splits from ``path`` (a ``.npz`` file or an image folder)."""
    if path.is_dir():
        return _read_folder(path, shape, seed)
    return read_site_npz(path, shape)


def read_site_npz(path: Path, shape: FederationShape) -> tuple[Split, Split]:
    arrays = _load_arrays(path)
    splits = []
    for split in ("train", "val"):
        images = _checked_images(path, f"{split}_images", arrays[f"{split}_images"], shape)
        labels = _checked_labels(path, f"{split}_labels", arrays[f"{split}_labels"], shape.num_classes)
        if len(images) != len(labels):
            raise SiteDataError(
                f"site data {path}: {split}_images holds {len(images)} images but {split}_labels "
                f"{len(labels)} labels; expected one label per image"
            )
        splits.append(Split(images, labels))
    if len(splits[0]) == 0:
        raise SiteDataError(f"site data {path}: train_images holds no images; a site needs training examples")
    return splits[0], splits[1]


def default_site_name(partition_id: int) -> str:
    """Simulated partition i's name, and the stem of the file ``fedmed-sites`` writes for it."""
    return f"site-{int(partition_id)}"


def examples_per_class(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=num_classes).tolist()


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SiteDataError(f"site data file {path} (node config data-path) does not exist")
    if not zipfile.is_zipfile(path):
        raise SiteDataError(f"site data file {path} is not a .npz archive (numpy.savez output); expected {LAYOUT_HINT}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in SITE_KEYS if key not in archive.files]
            if missing:
                raise SiteDataError(
                    f"site data file {path} lacks {', '.join(missing)} (it holds "
                    f"{', '.join(archive.files) or 'nothing'}); expected {LAYOUT_HINT}"
                )
            arrays = {}
            for key in SITE_KEYS:
                try:
                    arrays[key] = archive[key]
                except ValueError as err:
                    if "allow_pickle" not in str(err):
                        raise SiteDataError(
                            f"site data file {path}: {key} cannot be read ({err}); expected {LAYOUT_HINT}"
                        ) from err
                    raise SiteDataError(
                        f"site data file {path}: {key} holds Python objects, which a site never "
                        "unpickles; store it as a numeric array"
                    ) from err
            return arrays
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise SiteDataError(
            f"site data file {path} is not a valid .npz archive ({err}); expected {LAYOUT_HINT}"
        ) from err


def _checked_images(path: Path, key: str, images: np.ndarray, shape: FederationShape) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise SiteDataError(
            f"site data {path}: {key} has shape {images.shape}; expected (N, H, W) for grey or (N, H, W, C) images"
        )
    _, height, width, channels = images.shape
    if (height, width) != (shape.image_size, shape.image_size):
        raise SiteDataError(
            f"site data {path}: {key} holds {height}x{width} images; the federation's are "
            f"{shape.image_size}x{shape.image_size}: resize them"
        )
    if channels != shape.channels:
        raise SiteDataError(
            f"site data {path}: {key} holds images with {channels} channel(s) "
            f"({_channel_word(channels)}); the federation's have {shape.channels} "
            f"({_channel_word(shape.channels)}): convert them"
        )
    return _as_uint8(path, key, images)


def _channel_word(channels: int) -> str:
    return {1: "grey", 3: "RGB"}.get(channels, "neither grey nor RGB")


def _as_uint8(path: Path, key: str, images: np.ndarray) -> np.ndarray:
    """uint8 as is; integers within 0..255 cast exactly; floats rescaled explicitly and said so."""
    if images.dtype == np.uint8:
        return images
    if images.size == 0:
        return images.astype(np.uint8)
    if images.dtype.kind in "iu":
        low, high = int(images.min()), int(images.max())
        if low < 0 or high > 255:
            raise SiteDataError(
                f"site data {path}: {key} is {images.dtype} with values {low}..{high}; expected "
                "uint8 pixels 0..255: scale the images to 8 bits"
            )
        return images.astype(np.uint8)
    if images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise SiteDataError(
                f"site data {path}: {key} ({images.dtype}) holds NaN or infinite values; expected uint8 pixels 0..255"
            )
        low, high = float(images.min()), float(images.max())
        if low >= 0 and high <= 1:
            log.warning(
                "site data %s: %s is %s in [0, 1]; rescaled to uint8 0..255 (x * 255, rounded)", path, key, images.dtype
            )
            return np.rint(images * 255).astype(np.uint8)
        if low >= 0 and high <= 255:
            log.warning("site data %s: %s is %s in [0, 255]; rounded to uint8", path, key, images.dtype)
            return np.rint(images).astype(np.uint8)
        raise SiteDataError(
            f"site data {path}: {key} is {images.dtype} with values {low:g}..{high:g}; expected "
            "uint8 pixels 0..255 (floats are accepted in [0, 1] or [0, 255] only)"
        )
    raise SiteDataError(f"site data {path}: {key} is {images.dtype}; expected uint8 pixels 0..255")


def _checked_labels(path: Path, key: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
    if labels.dtype.kind not in "iu":
        raise SiteDataError(
            f"site data {path}: {key} is {labels.dtype}; expected integer class indices 0..{num_classes - 1}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise SiteDataError(
            f"site data {path}: {key} has shape {labels.shape}; expected (N,) or (N, 1), one "
            "class index per image (multi-label files are not supported)"
        )
    labels = labels.astype(np.int64)
    if len(labels):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise SiteDataError(
                f"site data {path}: {key} holds label {bad}; the federation has {num_classes} "
                f"classes, so labels must lie in 0..{num_classes - 1}"
            )
    return labels


def _read_folder(path: Path, shape: FederationShape, seed: int) -> tuple[Split, Split]:
    from fedmed.imagefolder import load_imagefolder

    # the folder's images are resized and converted to the federation's size and channels
    dataset = load_imagefolder(str(path), size=shape.image_size, channels=shape.channels, seed=seed)
    if dataset.num_classes != shape.num_classes:
        raise SiteDataError(
            f"site image folder {path} has {dataset.num_classes} class folders "
            f"({', '.join(dataset.class_names)}); the federation has {shape.num_classes} classes: "
            "give it one sub-folder per class, in the federation's order"
        )
    return dataset.train, dataset.val
