"""`fedmed-sites`: the files deployed sites get hold what the simulated clients train on."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.data import client_share, dataset_from_config, site_share
from fedmed.job import Job
from fedmed.seeds import Stream, seed_for
from fedmed.site_shift import apply_site_shift, site_shifts
from fedmed.sites import compose, main, write_sites
from fedmed.train import gather_batch

REPO = Path(__file__).resolve().parents[1]


def site_job(cfg, dataset) -> Job:
    return dataclasses.replace(
        Job.from_config(cfg), num_classes=dataset.num_classes, channels=dataset.channels, image_size=dataset.image_size
    )


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_site_files_hold_the_simulated_clients_shares(tmp_path, medmnist_root, partition):
    cfg = compose(
        [
            "dataset=pneumoniamnist",
            f"dataset.root={medmnist_root}",
            f"partition={partition}",
            "federation.num_clients=3",
            "seed=5",
        ]
    )
    manifest = write_sites(cfg, tmp_path)
    job = Job.from_config(cfg)
    dataset = dataset_from_config(job.dataset, 5)
    assert (manifest["dataset"], manifest["image_size"], manifest["channels"], manifest["num_classes"]) == (
        "pneumoniamnist",
        28,
        1,
        2,
    )
    assert manifest["class_names"] == list(dataset.class_names) and manifest["seed"] == 5
    assert manifest["partition"]["name"] == partition and not manifest["site_shift_baked"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    total = 0
    for i in range(3):
        simulated = client_share(job, i, 3)
        entry = manifest["sites"][f"site-{i}"]
        path = tmp_path / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with np.load(path, allow_pickle=False) as written:
            for split, indices in (("train", simulated.train_indices), ("val", simulated.val_indices)):
                assert written[f"{split}_images"].dtype == np.uint8 and written[f"{split}_labels"].dtype == np.uint8
                np.testing.assert_array_equal(written[f"{split}_images"], simulated.images[indices][..., 0])
                np.testing.assert_array_equal(written[f"{split}_labels"][:, 0], simulated.labels[indices])
                counts = np.bincount(simulated.labels[indices], minlength=2).tolist()
                assert entry[f"{split}_examples_per_class"] == counts
                assert entry[f"{split}_examples"] == len(indices)
        # what the deployed site reads back is what the simulated client trains and holds out on
        deployed = site_share(str(path), site_job(cfg, dataset))
        np.testing.assert_array_equal(
            deployed.images[deployed.train_indices], simulated.images[simulated.train_indices]
        )
        np.testing.assert_array_equal(deployed.labels[deployed.val_indices], simulated.labels[simulated.val_indices])
        total += entry["train_examples"] + entry["val_examples"]
    assert total == len(dataset.train)  # every training image at exactly one site


def test_site_partition_bakes_each_sites_scanner_into_its_images(tmp_path):
    overrides = ["partition=site", "federation.num_clients=2", "dataset.n_train=400", "seed=1"]
    write_sites(compose(overrides), tmp_path / "shifted")
    write_sites(compose([*overrides, "partition.site_strength=0"]), tmp_path / "identity")
    manifest = json.loads((tmp_path / "shifted" / "manifest.json").read_text())
    job = Job.from_config(compose(overrides))
    assert manifest["site_shift_baked"]
    shifts = site_shifts(2, seed_for(1, Stream.SITE_SHIFT), 1.0)  # the run's (seed=1) site-shift stream
    for i in range(2):
        simulated = client_share(job, i, 2)
        assert manifest["sites"][f"site-{i}"]["site_shift"] == json.loads(json.dumps(dataclasses.asdict(shifts[i])))
        raw = simulated.images[simulated.train_indices]
        with np.load(tmp_path / "identity" / f"site-{i}.npz") as unshifted:
            np.testing.assert_array_equal(unshifted["train_images"], raw[..., 0])  # strength 0: the raw images
        with np.load(tmp_path / "shifted" / f"site-{i}.npz") as shifted:
            baked = torch.from_numpy(shifted["train_images"].astype(np.float32) / 255)
        # the deterministic part of the shift (contrast, brightness, gains, blur), then the noise
        noiseless = dataclasses.replace(shifts[i], noise_std=0.0)
        expected = apply_site_shift(gather_batch(raw, np.arange(len(raw)), torch.device("cpu")), noiseless)[:, 0]
        inside = (expected > 0.1) & (expected < 0.9)  # away from the clamp at 0 and 1
        residual = (baked - expected)[inside]
        assert abs(float(residual.mean())) < 0.005
        assert float(residual.std()) == pytest.approx(shifts[i].noise_std, abs=0.003)  # 1/255 rounding
        change = float((baked - torch.from_numpy(raw[..., 0] / 255.0).float()).abs().mean())
        assert change > (0.002 if i == 0 else 0.01)  # site 0 is the mild reference site


def run_cli(*args: str, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDMED_DATA": str(data)}
    return subprocess.run(
        [sys.executable, "-m", "fedmed.sites", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_cli_writes_the_sites_and_manifest(tmp_path, medmnist_root):
    readme = ["dataset=pneumoniamnist", "federation.num_clients=3"]  # README, "Site data"
    done = run_cli(*readme, f"output_dir={tmp_path / 'sites'}", data=medmnist_root)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "sites" / "manifest.json").read_text())
    assert sorted(manifest["sites"]) == ["site-0", "site-1", "site-2"]
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == [
        "manifest.json",
        "site-0.npz",
        "site-1.npz",
        "site-2.npz",
    ]
    assert "site-2.npz: " in done.stdout


def test_cli_refuses_no_output_dir_a_used_folder_and_attacks(tmp_path, capsys):
    assert main(["federation.num_clients=2"]) == 2
    assert "output_dir is not set: give output_dir=DIR" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "site-0.npz").write_bytes(b"")
    assert main(["federation.num_clients=2", f"output_dir={tmp_path / 'used'}"]) == 2
    assert "already holds site-0.npz" in capsys.readouterr().err
    assert main(["attack=edge_case", f"output_dir={tmp_path / 'other'}"]) == 2
    assert "attack=edge_case: attacks are simulation only" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
