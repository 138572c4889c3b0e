"""Loader for the official MedMNIST v2 2D ``.npz`` files.

The files are checked against the official MD5 table (``medmnist_md5.json``, a copy of the
MD5s and split sizes MedMNIST publishes), then each array is extracted once to an uncompressed
``.npy`` file in a cache folder and returned as a read-only memory map. A compressed ``.npz``
cannot be memory-mapped; the extracted ``.npy`` files can, so every Ray worker process that
loads the same dataset shares one copy of the images through the operating system's page cache.

Typical use::

    data = load_medmnist("pneumoniamnist", size=28)   # looks in $FEDMED_DATA, then ~/.medmnist
    data.train.images   # uint8 (4708, 28, 28, 1), a read-only memory map
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.dataset import ArrayDataset, Split

SUPPORTED_SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
MD5_TABLE_PATH = Path(__file__).with_name("medmnist_md5.json")
ZENODO_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"


@dataclass(frozen=True)
class MedMNISTInfo:
    """What fedmed needs to know about one MedMNIST 2D dataset (from MedMNIST v2's INFO)."""

    python_class: str  # class name in the `medmnist` package, used in the download hint
    channels: int
    task: str
    class_names: tuple[str, ...]


_ORGAN_CLASSES = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# Hand-copied from MedMNIST v2 (medmnist/info.py, INFO[name]["label"], "n_channels", "task").
DATASETS: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(
        "PathMNIST",
        3,
        "multi-class",
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal colon mucosa",
            "cancer-associated stroma",
            "colorectal adenocarcinoma epithelium",
        ),
    ),
    "chestmnist": MedMNISTInfo(
        "ChestMNIST",
        1,
        "multi-label, binary-class",
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
    ),
    "dermamnist": MedMNISTInfo(
        "DermaMNIST",
        3,
        "multi-class",
        (
            "actinic keratoses and intraepithelial carcinoma",
            "basal cell carcinoma",
            "benign keratosis-like lesions",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        ),
    ),
    "octmnist": MedMNISTInfo(
        "OCTMNIST",
        1,
        "multi-class",
        (
            "choroidal neovascularization",
            "diabetic macular edema",
            "drusen",
            "normal",
        ),
    ),
    "pneumoniamnist": MedMNISTInfo(
        "PneumoniaMNIST",
        1,
        "binary-class",
        (
            "normal",
            "pneumonia",
        ),
    ),
    "retinamnist": MedMNISTInfo(
        "RetinaMNIST",
        3,
        "ordinal-regression",
        (
            "0",
            "1",
            "2",
            "3",
            "4",
        ),
    ),
    "breastmnist": MedMNISTInfo(
        "BreastMNIST",
        1,
        "binary-class",
        (
            "malignant",
            "normal, benign",
        ),
    ),
    "bloodmnist": MedMNISTInfo(
        "BloodMNIST",
        3,
        "multi-class",
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        ),
    ),
    "tissuemnist": MedMNISTInfo(
        "TissueMNIST",
        1,
        "multi-class",
        (
            "Collecting Duct, Connecting Tubule",
            "Distal Convoluted Tubule",
            "Glomerular endothelial cells",
            "Interstitial endothelial cells",
            "Leukocytes",
            "Podocytes",
            "Proximal Tubule Segments",
            "Thick Ascending Limb",
        ),
    ),
    "organamnist": MedMNISTInfo("OrganAMNIST", 1, "multi-class", _ORGAN_CLASSES),
    "organcmnist": MedMNISTInfo("OrganCMNIST", 1, "multi-class", _ORGAN_CLASSES),
    "organsmnist": MedMNISTInfo("OrganSMNIST", 1, "multi-class", _ORGAN_CLASSES),
}

# Datasets fedmed can train on: single-label 2D classification.
SUPPORTED_NAMES = tuple(name for name, info in DATASETS.items() if not info.task.startswith("multi-label"))

DATASETS_3D = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)

# Arrays loaded in this process, keyed by (file path, size, mtime, cache folder, verify flag),
# so that repeated calls return the very same memory maps.
_LOADED: dict[tuple, ArrayDataset] = {}
_LOADED_LOCK = threading.Lock()


def load_medmnist(
    name: str,
    size: int = 28,
    root: str | None = None,
    verify_md5: bool = True,
    cache_dir: str | None = None,
) -> ArrayDataset:
    """Load a MedMNIST v2 2D dataset with its official train/val/test splits.

    ``name`` is a MedMNIST 2D name such as ``"pneumoniamnist"``; ``size`` is 28, 64, 128 or 224.
    The file ``{name}.npz`` (size 28) or ``{name}_{size}.npz`` is looked up in ``root``, else in
    ``$FEDMED_DATA`` and then ``~/.medmnist``. With ``verify_md5`` (the default) a file whose MD5
    is not an official one is refused; without it the mismatch is only warned about.
    Arrays are extracted to ``cache_dir`` (else ``$FEDMED_CACHE``, else ``~/.cache/fedmed``)
    and returned as read-only memory maps: images uint8 (N, H, W, C), labels int64 (N,).
    """
    info = dataset_info(name)
    key_name = name.strip().lower()
    check_size(size)
    file_name = medmnist_file_name(key_name, size)
    path = find_medmnist_file(key_name, size, root)
    cache_root = resolve_cache_dir(cache_dir)

    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns, str(cache_root), verify_md5)
    with _LOADED_LOCK:
        if memo_key in _LOADED:
            return _LOADED[memo_key]

    md5 = file_md5_cached(path, cache_root)
    expected_sizes = check_md5(path, file_name, md5, verify_md5)
    arrays = extract_npz(path, cache_root / "medmnist" / md5)
    splits = {split: make_split(path, arrays, split, info, size) for split in SPLITS}
    check_split_sizes(path, splits, expected_sizes, verify_md5)

    dataset = ArrayDataset(
        name=key_name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        class_names=info.class_names,
    )
    with _LOADED_LOCK:
        _LOADED[memo_key] = dataset
    return dataset


# ----------------------------------------------------------------------------------------------
# Names, sizes and paths


def dataset_info(name: str) -> MedMNISTInfo:
    """The table entry for ``name``; a clear error for multi-label, 3D and unknown names."""
    key = str(name).strip().lower()
    supported = ", ".join(SUPPORTED_NAMES)
    if key in DATASETS and key not in SUPPORTED_NAMES:
        raise ValueError(
            f"MedMNIST dataset {name!r} is multi-label ({DATASETS[key].task}, "
            f"{len(DATASETS[key].class_names)} labels per image); fedmed trains single-label "
            f"classifiers and does not support it. Pick one of: {supported}."
        )
    if key in DATASETS_3D or key.endswith("3d"):
        raise ValueError(
            f"MedMNIST dataset {name!r} is a 3D dataset; fedmed supports only the 2D datasets: {supported}."
        )
    if key not in DATASETS:
        raise ValueError(f"Unknown MedMNIST dataset {name!r}. Supported 2D datasets: {supported}.")
    return DATASETS[key]


def check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size not in SUPPORTED_SIZES:
        raise ValueError(
            f"MedMNIST image size {size!r} is not available; the official files come in sizes "
            f"{', '.join(map(str, SUPPORTED_SIZES))}."
        )


def medmnist_file_name(name: str, size: int) -> str:
    """``pneumoniamnist.npz`` for 28 px, ``pneumoniamnist_64.npz`` for the larger sizes."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def candidate_roots(root: str | None) -> list[Path]:
    """Folders to search: ``root`` if given, else ``$FEDMED_DATA`` (if set) and ``~/.medmnist``."""
    if root is not None:
        return [Path(root).expanduser()]
    roots = []
    env_root = os.environ.get("FEDMED_DATA")
    if env_root:
        roots.append(Path(env_root).expanduser())
    roots.append(Path("~/.medmnist").expanduser())
    return roots


def find_medmnist_file(name: str, size: int, root: str | None = None) -> Path:
    """Absolute path of the dataset's ``.npz``; ``FileNotFoundError`` with download help if absent."""
    info = dataset_info(name)
    file_name = medmnist_file_name(name, size)
    roots = candidate_roots(root)
    searched = [r / file_name for r in roots]
    for candidate in searched:
        if candidate.is_file():
            return candidate.resolve()
    download_root = roots[0]
    raise FileNotFoundError(
        f"MedMNIST file {file_name} not found. Searched:\n"
        + "".join(f"  {p}\n" for p in searched)
        + "Get it with the medmnist package:\n"
        f"  pip install medmnist\n"
        f"  mkdir -p {download_root}\n"
        f"  python -c \"import medmnist; medmnist.{info.python_class}(split='train', "
        f"download=True, size={size}, root='{download_root}')\"\n"
        f"or download {ZENODO_URL.format(file=file_name)} into {download_root}. "
        "Set dataset.root (or $FEDMED_DATA) to the folder that holds the file."
    )


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """``cache_dir`` argument, else ``$FEDMED_CACHE``, else ``~/.cache/fedmed``."""
    if cache_dir is None:
        cache_dir = os.environ.get("FEDMED_CACHE") or "~/.cache/fedmed"
    return Path(cache_dir).expanduser().resolve()


# ----------------------------------------------------------------------------------------------
# MD5 verification


def official_md5_table() -> dict[str, dict]:
    """The official table: md5 -> {"file", "versions", "n_samples": {"train", "val", "test"}}."""
    with open(MD5_TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


def compute_md5(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    """MD5 of a file, read in chunks so that multi-GB files do not fill memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5_cached(path: Path, cache_root: Path) -> str:
    """MD5 of ``path``, remembered in ``{cache}/medmnist/md5_cache.json``.

    Keyed by (absolute path, size in bytes, mtime) so that a large file is hashed once, and
    re-hashed when it is replaced or modified.
    """
    cache_file = cache_root / "medmnist" / "md5_cache.json"
    stat = path.stat()
    entry_key = str(path.resolve())
    cache = _read_json(cache_file)
    entry = cache.get(entry_key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("md5"), str)
    ):
        return entry["md5"]

    md5 = compute_md5(path)
    # Re-read just before writing: another process may have added entries meanwhile.
    cache = _read_json(cache_file)
    cache[entry_key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": md5}
    try:
        _write_atomic(cache_file, json.dumps(cache, indent=1, sort_keys=True).encode())
    except OSError as err:  # a read-only cache only costs a re-hash next time
        warnings.warn(f"Could not write the MD5 cache {cache_file}: {err}", stacklevel=2)
    return md5


def check_md5(path: Path, file_name: str, md5: str, verify_md5: bool) -> list[dict]:
    """Compare ``md5`` with the official ones for ``file_name``; return the split sizes expected.

    Returns the ``n_samples`` of the matching official release, or, when the MD5 matches none
    and ``verify_md5`` is off, of every official release of that file.
    """
    table = official_md5_table()
    official = {m: entry for m, entry in table.items() if entry["file"] == file_name}
    if md5 in official:
        return [official[md5]["n_samples"]]
    expected = ", ".join(sorted(official)) or "(none listed)"
    message = (
        f"{path}: MD5 {md5} does not match the official MD5 of {file_name} ({expected}). "
        "The file is incomplete, damaged or not an official MedMNIST release. Delete it and "
        f"download it again ({ZENODO_URL.format(file=file_name)}, or the medmnist package with "
        "download=True)"
    )
    if verify_md5:
        raise ValueError(message + ", or set dataset.verify_md5=false to use it anyway.")
    warnings.warn(message + "; using it anyway because dataset.verify_md5=false.", stacklevel=3)
    return [entry["n_samples"] for entry in official.values()]


def check_split_sizes(path: Path, splits: dict[str, Split], expected_sizes: list[dict], verify_md5: bool) -> None:
    found = {split: len(splits[split]) for split in SPLITS}
    if not expected_sizes or any(all(found[s] == sizes[s] for s in SPLITS) for sizes in expected_sizes):
        return
    message = (
        f"{path}: split sizes {found} differ from the official ones ({' or '.join(str(s) for s in expected_sizes)})."
    )
    if verify_md5:
        raise ValueError(message + " Delete the file and download it again.")
    warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Extraction to memory-mappable .npy files


def extract_npz(path: Path, out_dir: Path) -> dict[str, np.ndarray]:
    """Extract every member of the ``.npz`` at ``path`` into ``out_dir``; return memory maps.

    Members are streamed (never fully decompressed in memory) to a temporary file and then
    renamed into place, so a half-written file is never seen by another process and a
    present ``.npy`` is always complete.
    """
    required = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(m).stem: m for m in archive.namelist() if m.endswith(".npy")}
            missing = [key for key in required if key not in members]
            if missing:
                raise ValueError(
                    f"{path}: not a MedMNIST file, keys {missing} are missing (found "
                    f"{sorted(members)}). Delete it and download it again."
                )
            out_dir.mkdir(parents=True, exist_ok=True)
            arrays = {}
            for key in required:
                target = out_dir / f"{key}.npy"
                if not target.is_file():
                    _extract_member(archive, members[key], target, path)
                arrays[key] = _open_npy(target, path, key)
            return arrays
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"{path}: not a valid .npz (zip) file ({err}). The file is damaged or incomplete; "
            "delete it and download it again."
        ) from err


def _extract_member(archive: zipfile.ZipFile, member: str, target: Path, source: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, archive.open(member) as src:
            shutil.copyfileobj(src, out, length=8 * 1024 * 1024)
        # Check the header before publishing the file under its final name.
        _open_npy(Path(tmp_name), source, Path(member).stem)
        os.replace(tmp_name, target)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
        raise ValueError(
            f"{source}: could not extract {member} ({err}). The file is damaged or incomplete; "
            "delete it and download it again."
        ) from err
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _open_npy(path: Path, source: Path, key: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"{source}: array {key!r} is not a plain numeric array ({err}). Delete the file and download it again."
        ) from err


def make_split(path: Path, arrays: dict[str, np.ndarray], split: str, info: MedMNISTInfo, size: int) -> Split:
    """Check shapes and dtypes; grey (N, H, W) becomes (N, H, W, 1) without copying."""
    images = arrays[f"{split}_images"]
    labels = arrays[f"{split}_labels"]
    expected = (size, size) if info.channels == 1 else (size, size, 3)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(
            f"{path}: {split}_images is {images.dtype} {images.shape}, expected uint8 "
            f"(N, {', '.join(map(str, expected))}). Delete the file and download it again."
        )
    if info.channels == 1:
        images = images.reshape(*images.shape, 1)  # a view of the memory map, not a copy
    n = images.shape[0]
    if labels.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"{path}: {split}_labels has shape {labels.shape}, expected ({n}, 1) to match "
            f"{split}_images. Delete the file and download it again."
        )
    labels = np.asarray(labels).reshape(n).astype(np.int64)  # small: a private copy is fine
    num_classes = len(info.class_names)
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: {split}_labels range from {labels.min()} to {labels.max()}, expected "
            f"0..{num_classes - 1}. Delete the file and download it again."
        )
    return Split(images=images, labels=labels)


# ----------------------------------------------------------------------------------------------
# Small file helpers


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent or damaged cache: start afresh
        return {}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
