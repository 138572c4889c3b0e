"""Loader for a hospital's own images stored as one sub-folder per class.

Two layouts are accepted::

    root/<class>/<image>                        one pool, split here (seeded, stratified)
    root/train/<class>/<image>                  ready-made splits; val/ and test/ optional,
    root/val/<class>/<image>                    a missing one is carved out of train
    root/test/<class>/<image>

Class names are the sorted sub-folder names (of ``root`` or ``root/train``). Images are read
once with PIL, converted to grey ('L') or RGB, resized to ``size`` x ``size`` and stacked into
uint8 (N, H, W, C) arrays, the form every fedmed dataset takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedmed.dataset import ArrayDataset, Split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "val", "test")


def load_imagefolder(
    root: str,
    size: int = 64,
    channels: int = 3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ArrayDataset:
    """Load ``root`` (one sub-folder per class, or train/val/test folders of those).

    ``val_fraction`` and ``test_fraction`` are used only for splits that have no folder of
    their own; the split is stratified (each class keeps its share) and fixed by ``seed``.
    """
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"Image folder {root_path} does not exist. Point dataset.root at a folder with one "
            "sub-folder of images per class (or train/, val/, test/ folders of those)."
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}.")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {fraction!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 to leave training images, got "
            f"{val_fraction} + {test_fraction}."
        )

    split_layout = _has_class_folders(root_path / "train")
    pool_root = root_path / "train" if split_layout else root_path
    class_names = _class_names(pool_root)
    pool = _list_images(pool_root, class_names, allow_missing=False)

    rng = np.random.default_rng(seed)
    given = {}
    if split_layout:
        for split in ("val", "test"):
            if (root_path / split).is_dir():
                _check_no_unknown_classes(root_path / split, class_names)
                given[split] = _list_images(root_path / split, class_names, allow_missing=True)
    fractions = {
        "val": 0.0 if "val" in given else val_fraction,
        "test": 0.0 if "test" in given else test_fraction,
    }
    train, carved_val, carved_test = _stratified_split(pool, fractions["val"], fractions["test"], rng)
    files = {
        "train": train,
        "val": given.get("val", carved_val),
        "test": given.get("test", carved_test),
    }

    splits = {split: _read_split(files[split], size, channels) for split in SPLIT_FOLDERS}
    return ArrayDataset(
        name="imagefolder",
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=tuple(class_names),
    )


def class_counts(root: str) -> list[int]:
    """Images per class in ``root``'s training pool and val/ folder, counted without reading them
    (what a deployed site tells the server about its data)."""
    root_path = Path(root).expanduser()
    split_layout = _has_class_folders(root_path / "train")
    pool_root = root_path / "train" if split_layout else root_path
    class_names = _class_names(pool_root)
    items = _list_images(pool_root, class_names, allow_missing=False)
    if split_layout and (root_path / "val").is_dir():
        items += _list_images(root_path / "val", class_names, allow_missing=True)
    return np.bincount([label for _, label in items], minlength=len(class_names)).tolist()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(folder: Path) -> list[Path]:
    # Hidden folders (.git, .ipynb_checkpoints) are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and bool(_class_dirs(folder))


def _class_names(folder: Path) -> list[str]:
    names = [p.name for p in _class_dirs(folder)]
    if not names:
        raise ValueError(
            f"{folder} has no class sub-folders. Put the images of each class in their own "
            f"sub-folder, e.g. {folder}/normal/img001.png and {folder}/pneumonia/img002.png."
        )
    return names


def _check_no_unknown_classes(folder: Path, class_names: list[str]) -> None:
    unknown = sorted({p.name for p in _class_dirs(folder)} - set(class_names))
    if unknown:
        raise ValueError(
            f"{folder} has class folders {unknown} that {folder.parent / 'train'} lacks; "
            f"the classes are taken from train/: {class_names}."
        )


def _list_images(folder: Path, class_names: list[str], allow_missing: bool) -> list[tuple[Path, int]]:
    """(file, label) pairs in a fixed (sorted) order, so a seed always gives the same split."""
    items = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            if allow_missing:
                continue
            raise ValueError(f"{class_dir} is missing; expected a folder of images for class {name!r}.")
        files = sorted(p for p in class_dir.iterdir() if _is_image(p))
        if not files:
            raise ValueError(
                f"Class folder {class_dir} has no images (accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
            )
        items.extend((f, label) for f in files)
    return items


def _stratified_split(
    items: list[tuple[Path, int]], val_fraction: float, test_fraction: float, rng: np.random.Generator
) -> tuple[list, list, list]:
    """Shuffle each class and cut it into test, val and train parts of the given shares."""
    labels = np.array([label for _, label in items])
    train, val, test = [], [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(indices) * test_fraction))
        n_val = int(round(len(indices) * val_fraction))
        # A tiny class keeps at least one training image.
        if n_test + n_val >= len(indices):
            n_val = max(0, min(n_val, len(indices) - 1 - n_test))
            n_test = max(0, min(n_test, len(indices) - 1))
        test += [items[i] for i in indices[:n_test]]
        val += [items[i] for i in indices[n_test : n_test + n_val]]
        train += [items[i] for i in indices[n_test + n_val :]]
    # Back to file order within each split, so the arrays do not depend on the class loop.
    return sorted(train), sorted(val), sorted(test)


def _read_split(items: list[tuple[Path, int]], size: int, channels: int) -> Split:
    images = np.empty((len(items), size, size, channels), dtype=np.uint8)
    labels = np.empty(len(items), dtype=np.int64)
    for i, (path, label) in enumerate(items):
        images[i] = _read_image(path, size, channels)
        labels[i] = label
    return Split(images=images, labels=labels)


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            if img.mode.startswith(("I", "F")):
                img = _to_8bit(img)
            img = img.convert(mode).resize((size, size), Image.Resampling.BICUBIC)
            pixels = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"Could not read image {path}: {err}. Fix or remove the file.") from err
    return pixels.reshape(size, size, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Stretch a 16-bit or float image to 0..255.

    PIL's convert('L') clips such images at 255 instead of scaling them, which turns most
    16-bit X-rays and CT slices white.
    """
    values = np.asarray(img, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(((values - low) * scale).round().astype(np.uint8))
