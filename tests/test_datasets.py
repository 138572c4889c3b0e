"""The dataset registry (fedmed/datasets/): every option composes with its own keys only, refuses
keys and values it cannot use by name, and is loaded through the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from fedmed.data import dataset_from_config, load_dataset
from fedmed.dataset import ArrayDataset, Split
from fedmed.datasets import (
    DATASETS,
    Dataset,
    DatasetConfig,
    check_dataset,
    dataset_config,
    dataset_named,
    dataset_section,
    register,
)
from fedmed.datasets.imagefolder import ImageFolderConfig
from fedmed.datasets.medmnist import MedMNISTConfig
from fedmed.datasets.synthetic import SyntheticConfig
from fedmed.job import Job
from fedmed.medmnist import SUPPORTED_NAMES
from strategies.preflight import prepare_config
from tests.helpers import compose_config

MEDMNIST = (
    "pathmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)


def test_the_registry_lists_every_dataset():
    assert list(DATASETS) == ["synthetic", *MEDMNIST, "imagefolder"]
    assert set(MEDMNIST) == set(SUPPORTED_NAMES) and "chestmnist" not in DATASETS  # multi-label
    assert all(DATASETS[name].config is MedMNISTConfig for name in MEDMNIST)
    with pytest.raises(ValueError, match="dataset='chestmnist' is not known; use one of synthetic, pathmnist"):
        dataset_named("chestmnist")


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_option_composes_with_its_own_keys(name):
    root = ["dataset.root=/data/images"] if name == "imagefolder" else []  # imagefolder requires it
    cfg = compose_config(f"dataset={name}", *root)
    option = dataset_named(name)
    assert cfg.dataset.name == name
    assert list(cfg.dataset) == [field.name for field in dataclasses.fields(option.config)]
    config = dataset_config(cfg.dataset)
    assert type(config) is option.config and config.name == name
    # a client rebuilds the same typed config from the plain dict its job carries
    assert Job.from_config(cfg).dataset == config


def test_options_have_their_documented_defaults():
    assert dataset_config(compose_config().dataset) == SyntheticConfig()
    assert dataset_config(compose_config("dataset=bloodmnist").dataset) == MedMNISTConfig(name="bloodmnist")
    assert dataset_section("imagefolder", root="/x") == dataclasses.asdict(ImageFolderConfig(root="/x"))
    with pytest.raises(ValueError, match="dataset=pneumoniamnist has no key n_train"):
        dataset_section("pneumoniamnist", n_train=5)


def test_synthetic_chooses_adam_and_explicit_client_overrides_win():
    default = compose_config()
    assert (default.dataset.name, default.client.optimizer, default.client.lr) == ("synthetic", "adam", 0.001)
    lr = compose_config("client.lr=0.01")
    assert (lr.client.optimizer, lr.client.lr) == ("adam", 0.01)
    # the override wins wherever it stands on the command line
    sgd = compose_config("client.optimizer=sgd", "dataset=synthetic")
    assert (sgd.client.optimizer, sgd.client.lr) == ("sgd", 0.001)
    medmnist = compose_config("dataset=pneumoniamnist")
    assert (medmnist.client.optimizer, medmnist.client.lr) == ("sgd", 0.01)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["dataset=pneumoniamnist", "dataset.n_train=5"], "n_train"),  # a synthetic key
        (["dataset=breastmnist", "dataset.channels=3"], "channels"),
        (["dataset.root=/data"], "root"),  # synthetic has no root
        (["dataset=imagefolder", "dataset.verify_md5=false"], "verify_md5"),
        (["dataset.n_train=many"], "n_train"),  # wrong type
        (["dataset=organamnist", "dataset.size=big"], "size"),
    ],
)
def test_a_key_the_chosen_dataset_does_not_have_is_a_hydra_error_naming_it(overrides, key):
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(*overrides)
    assert f"dataset.{key}" in f"{error.value} {error.value.__cause__}"


def test_a_client_job_with_a_key_its_dataset_does_not_have_is_refused_by_name():
    message = (
        "dataset=pneumoniamnist has no key dataset.n_train; its keys are "
        "dataset.name, dataset.root, dataset.size, dataset.verify_md5"
    )
    with pytest.raises(ValueError, match=message):
        check_dataset({"name": "pneumoniamnist", "n_train": 5})
    with pytest.raises(ValueError, match="dataset.root"):
        load_dataset("synthetic", seed=0, root="/data")


def test_dropped_chestmnist_lists_the_datasets_there_are():
    with pytest.raises(ConfigCompositionException, match="pneumoniamnist"):
        compose_config("dataset=chestmnist")


@pytest.mark.parametrize(
    "section, message",
    [
        ({"name": "pneumoniamnist", "size": 32}, "dataset.size=32 is not a MedMNIST size; .* 28, 64, 128, 224"),
        ({"name": "synthetic", "size": 4}, "dataset.size=4 must be >= 8"),
        ({"name": "synthetic", "channels": 2}, "dataset.channels=2 must be 1 .grey. or 3 .RGB."),
        ({"name": "synthetic", "num_classes": 7}, "dataset.num_classes=7 must be from 2 to 6"),
        ({"name": "synthetic", "num_classes": 1}, "dataset.num_classes=1"),
        ({"name": "synthetic", "n_train": 0}, "dataset.n_train=0 must be >= 1"),
        ({"name": "synthetic", "n_test": -3}, "dataset.n_test=-3 must be >= 1"),
        ({"name": "imagefolder"}, "dataset.root=None is required: set dataset.root=<folder"),
        ({"name": "imagefolder", "root": "/x", "channels": 4}, "dataset.channels=4"),
        ({"name": "imagefolder", "root": "/x", "size": 0}, "dataset.size=0 must be >= 1"),
        ({"name": "imagefolder", "root": "/x", "val_fraction": 1.0}, r"dataset.val_fraction=1.0 must be in \[0, 1\)"),
        ({"name": "imagefolder", "root": "/x", "test_fraction": -0.1}, "dataset.test_fraction=-0.1"),
        (
            {"name": "imagefolder", "root": "/x", "val_fraction": 0.5, "test_fraction": 0.5},
            "dataset.val_fraction=0.5 \\+ dataset.test_fraction=0.5 must be below 1",
        ),
    ],
)
def test_values_out_of_range_are_refused_by_name(section, message):
    with pytest.raises(ValueError, match=message):
        check_dataset(section)


def test_the_dataset_is_checked_before_any_process_starts():
    with pytest.raises(ValueError, match="dataset.root=None is required"):
        prepare_config(compose_config("dataset=imagefolder"))
    with pytest.raises(ValueError, match="dataset.size=30"):
        prepare_config(compose_config("dataset=retinamnist", "dataset.size=30"))


def test_datasets_are_loaded_through_the_registry_and_cached_by_their_values():
    section = {"name": "synthetic", "n_train": 40, "n_val": 6, "n_test": 12}
    data = dataset_from_config(section, seed=3)
    assert (data.name, len(data.train), len(data.val), len(data.test)) == ("synthetic", 40, 6, 12)
    assert dataset_from_config(dict(section), seed=3) is data  # same values: the cached arrays
    assert dataset_from_config(OmegaConf.create(section), seed=3) is data
    assert dataset_from_config({**section, "n_train": 41}, seed=3) is not data
    assert dataset_from_config(section, seed=4) is not data


@dataclass
class _StripesConfig(DatasetConfig):
    name: str = "stripes"
    n: int = 8

    def check(self) -> None:
        if self.n < 2:
            raise ValueError(f"dataset.n={self.n} must be >= 2")


def _stripes(config: _StripesConfig, seed: int) -> ArrayDataset:
    labels = np.arange(config.n) % 2
    images = np.zeros((config.n, 8, 8, 1), dtype=np.uint8)
    images[labels == 1, ::2] = 255
    split = Split(images, labels.astype(np.int64))
    return ArrayDataset("stripes", split, split, split, ("plain", "striped"))


@pytest.fixture
def stripes_dataset():
    from hydra.core.config_store import ConfigStore

    register(Dataset("stripes", _StripesConfig, _stripes, client={"batch_size": 4}))
    yield
    del DATASETS["stripes"]
    ConfigStore.instance().repo["dataset"].pop("stripes.yaml")


def test_a_new_dataset_is_one_config_one_loader_and_its_registration(stripes_dataset):
    cfg = compose_config("dataset=stripes", "dataset.n=6")
    assert (
        cfg.client.batch_size == 4 and compose_config("dataset=stripes", "client.batch_size=2").client.batch_size == 2
    )
    data = dataset_from_config(Job.from_config(cfg).dataset, int(cfg.seed))
    assert (data.name, len(data.train), data.num_classes) == ("stripes", 6, 2)
    with pytest.raises(ValueError, match="dataset.n=1 must be >= 2"):
        check_dataset({"name": "stripes", "n": 1})
    with pytest.raises(ConfigCompositionException):
        compose_config("dataset=stripes", "dataset.size=28")


def test_a_run_folder_from_the_flat_schema_resumes_with_its_options_keys(tmp_path):
    from fedmed.checkpoint import resumed_config

    flat = {  # every family's keys, as config.yaml held them before the registry
        "name": "pneumoniamnist",
        "root": "/data",
        "size": 28,
        "verify_md5": True,
        "channels": 1,
        "num_classes": 3,
        "n_train": 2000,
        "n_val": 300,
        "n_test": 600,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
    }
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"dataset": flat, "seed": 0}))
    saved = resumed_config(tmp_path, compose_config(), [])
    assert OmegaConf.to_container(saved.dataset) == {
        "name": "pneumoniamnist",
        "root": "/data",
        "size": 28,
        "verify_md5": True,
    }
    assert dataset_config(saved.dataset) == MedMNISTConfig(name="pneumoniamnist", root="/data")
