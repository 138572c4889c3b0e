"""`fedmed-sites`: one data file per site, the same split a simulated federation trains on.

Composed from the same configuration as `fedmed-sim` (``dataset``, ``partition``,
``federation.num_clients``, ``seed``, ``client.val_fraction``), it writes into ``output_dir=DIR``
``site-<i>.npz`` (uint8 ``train_images/train_labels/val_images/val_labels``, MedMNIST layout) for
every partition i, holding exactly what simulated client i trains on and holds out, and
``manifest.json``: each file's SHA-256 and examples per class, and the dataset, image size,
channels, classes, seed and partition a coordinator checks the sites against.

``partition=site``: the simulation shifts each partition's appearance on the fly (contrast,
brightness, colour, blur, noise: ``fedmed.site_shift``). Here the shift is baked into the written
images, as a hospital's scanner bakes its look into every image it takes, so deployed sites
differ the way simulated ones do. The noise is drawn once per image from a seeded generator
(the simulation draws it afresh for every batch), and the result is rounded to uint8.

    fedmed-sites dataset=pneumoniamnist federation.num_clients=3 output_dir=sites/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fedmed.data import ClientShare, client_share, dataset_from_config
from fedmed.job import Job
from fedmed.seeds import Stream, seed_for
from fedmed.site_data import default_site_name, examples_per_class
from fedmed.site_shift import SiteShift, apply_site_shift
from fedmed.train import gather_batch

MANIFEST = "manifest.json"
BAKE_CHUNK = 1024  # images shifted at a time: bounds the float copy at large image sizes


def compose(overrides: list[str]) -> DictConfig:
    """The configuration `fedmed-sim` would compose from ``overrides``."""
    import configs  # the application's configuration, above fedmed/ and strategies/

    return configs.compose(overrides)


def write_sites(cfg: DictConfig, output_dir: Path) -> dict:
    """Write every site's file and the manifest into ``output_dir``; returns the manifest."""
    if cfg.attack.name != "none":
        raise ValueError(
            f"attack={cfg.attack.name}: attacks are simulation only and deployed sites refuse them; "
            "write site files with attack=none"
        )
    num_sites = int(cfg.federation.num_clients)
    if num_sites < 1:
        raise ValueError(f"federation.num_clients={num_sites} must be >= 1")
    existing = sorted(p.name for p in output_dir.glob("site-*.npz")) + sorted(p.name for p in output_dir.glob(MANIFEST))
    if existing:
        raise ValueError(
            f"output_dir={output_dir} already holds {', '.join(existing)}; give an empty folder "
            "(old site files would mix with the new split)"
        )
    job = Job.from_config(cfg)
    seed = job.seed
    dataset = dataset_from_config(job.dataset, seed)
    if dataset.num_classes > 256:
        raise ValueError(f"dataset {dataset.name} has {dataset.num_classes} classes; uint8 labels hold 256 at most")
    output_dir.mkdir(parents=True, exist_ok=True)
    sites = {}
    for partition_id in range(num_sites):
        share = client_share(job, partition_id, num_sites)
        name = default_site_name(partition_id)
        path = output_dir / f"{name}.npz"
        arrays = site_arrays(share, seed, partition_id)
        np.savez_compressed(path, **arrays)
        sites[name] = {
            "file": path.name,
            "sha256": sha256(path),
            "train_examples": len(share.train_indices),
            "val_examples": len(share.val_indices),
            "train_examples_per_class": examples_per_class(arrays["train_labels"], dataset.num_classes),
            "val_examples_per_class": examples_per_class(arrays["val_labels"], dataset.num_classes),
        }
        if share.site_shift is not None:
            sites[name]["site_shift"] = dataclasses.asdict(share.site_shift)
    manifest = {
        "dataset": dataset.name,
        "image_size": dataset.image_size,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "class_names": list(dataset.class_names),
        "seed": seed,
        "partition": dataclasses.asdict(job.partition),
        "num_sites": num_sites,
        "val_fraction": job.client.val_fraction,
        "site_shift_baked": job.partition.name == "site",
        "sites": sites,
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def site_arrays(share: ClientShare, seed: int, partition_id: int) -> dict[str, np.ndarray]:
    """The share's train and validation images and labels in the MedMNIST layout: uint8 images
    (N, H, W) for grey, (N, H, W, C) otherwise; uint8 labels (N, 1)."""
    arrays = {}
    for split, indices in (("train", share.train_indices), ("val", share.val_indices)):
        images = share.images[indices]
        if share.site_shift is not None:
            images = bake_site_shift(
                images, share.site_shift, seed_for(seed, Stream.SITE_FILES, partition_id, int(split == "val"))
            )
        arrays[f"{split}_images"] = images[..., 0] if images.shape[-1] == 1 else images
        arrays[f"{split}_labels"] = share.labels[indices].astype(np.uint8).reshape(-1, 1)
    return arrays


def bake_site_shift(images: np.ndarray, shift: SiteShift, seed: int) -> np.ndarray:
    """uint8 (N, H, W, C) images as seen at ``shift``'s site, rounded back to uint8."""
    generator = torch.Generator().manual_seed(seed)
    out = np.empty_like(images)
    for start in range(0, len(images), BAKE_CHUNK):
        rows = np.arange(start, min(start + BAKE_CHUNK, len(images)))
        shifted = apply_site_shift(gather_batch(images, rows, torch.device("cpu")), shift, generator)
        out[rows] = shifted.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


USAGE = (
    "usage: fedmed-sites [hydra overrides] output_dir=DIR\n"
    "writes DIR/site-<i>.npz for each of federation.num_clients sites and DIR/manifest.json, with the "
    "split `fedmed-sim` uses for the same dataset, partition, seed and client.val_fraction"
)


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE)
        return 0
    try:
        cfg = compose(overrides)
        if not cfg.output_dir:
            raise ValueError(
                f"output_dir is not set: give output_dir=DIR, the folder to write site-<i>.npz and {MANIFEST} into"
            )
        output_dir = Path(cfg.output_dir)
        manifest = write_sites(cfg, output_dir)
    except (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as error:
        print(f"fedmed-sites: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {manifest['num_sites']} site files ({manifest['dataset']}, {manifest['partition']['name']} "
        f"partition, seed {manifest['seed']}) and {MANIFEST} to {output_dir.resolve()}"
    )
    for site in manifest["sites"].values():
        print(
            f"  {site['file']}: {site['train_examples']} train, {site['val_examples']} val, train examples "
            f"per class {site['train_examples_per_class']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
