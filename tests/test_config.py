"""The Hydra configuration: contract keys, typed fields, clear errors for typos."""

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from fedmed.runner import backend_config, check_config
from tests.helpers import compose_config

CONTRACT_KEYS = [
    "dataset.name",
    "dataset.size",
    "model.name",
    "model.pretrained",
    "partition.name",
    "partition.alpha",
    "federation.num_clients",
    "federation.clients_per_round",
    "federation.rounds",
    "client.epochs",
    "client.batch_size",
    "client.lr",
    "defense.name",
    "attack.name",
    "strategy.name",
    "eval.every",
    "eval.attacks",
    "eval.eps",
    "seed",
    "device",
    "ray.address",
    "ray.num_cpus_per_client",
    "ray.num_gpus_per_client",
]


def test_default_has_every_contract_key():
    cfg = compose_config()
    for key in CONTRACT_KEYS:
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    assert cfg.dataset.name == "synthetic"
    # each dataset option has its own keys (fedmed/datasets/): root is a MedMNIST and image-folder one
    for name in ("pneumoniamnist", "imagefolder"):
        assert "root" in compose_config(f"dataset={name}").dataset


@pytest.mark.parametrize(
    "name",
    [
        "pneumoniamnist",
        "breastmnist",
        "retinamnist",
        "dermamnist",
        "bloodmnist",
        "pathmnist",
        "organamnist",
        "imagefolder",
    ],
)
def test_dataset_group_has_every_contract_dataset(name):
    assert compose_config(f"dataset={name}").dataset.name == name


@pytest.mark.parametrize("name", ["densenet121", "mobilenet_v2", "resnet50", "resnet18"])
def test_model_group(name):
    assert compose_config(f"model={name}").model.name == name


def test_typo_in_key_is_an_error_naming_it():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_config("federation.num_clinets=3")
    assert "num_clinets" in str(err.value) or "num_clinets" in str(err.value.__cause__)


def test_wrong_type_is_an_error():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config("federation.rounds=many")


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(ConfigCompositionException, match="fedavg"):
        compose_config("strategy=fedavgg")


def test_clients_per_round_checked_before_starting():
    with pytest.raises(ValueError, match="clients_per_round"):
        check_config(compose_config("federation.num_clients=3", "federation.clients_per_round=4"))


def test_backend_config_maps_ray_keys():
    cfg = compose_config("ray.num_cpus_per_client=2", "ray.num_gpus_per_client=0.25", "ray.address=auto")
    backend = backend_config(cfg.ray)
    assert backend["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert backend["init_args"]["address"] == "auto"
    # without ray.address a run starts a Ray instance of its own, never joins a leftover cluster
    local = backend_config(compose_config("ray.num_cpus=2").ray)["init_args"]
    assert local["address"] == "local" and local["num_cpus"] == 2


@pytest.mark.parametrize(
    "override, key",
    [
        ("client.lr=-1", "client.lr"),
        ("client.batch_size=0", "client.batch_size"),
        ("client.epochs=0", "client.epochs"),
        ("client.optimizer=rmsprop", "client.optimizer"),
        ("client.momentum=1.5", "client.momentum"),
        ("client.val_fraction=1.0", "client.val_fraction"),
        ("eval.max_clients=0", "eval.max_clients"),
        ("eval.every=0", "eval.every"),
        ("attack=badnets attack.fraction=1.5", "attack.fraction"),
    ],
)
def test_values_out_of_range_are_refused_before_any_process_starts(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(compose_config(*override.split()))


def test_a_setting_the_chosen_option_lacks_is_refused_at_composition():
    # attack=none (the default) has no fraction: the setting would do nothing, so it is an error
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("attack.fraction=1.5")
    assert "attack.fraction" in str(err.value) + str(err.value.__cause__)


def test_dropped_chestmnist_preset_lists_the_datasets_there_are():
    # ChestMNIST is multi-label; fedmed trains single-label classifiers, so it has no preset
    with pytest.raises(ConfigCompositionException, match="pneumoniamnist"):
        compose_config("dataset=chestmnist")


def test_zero_rounds_is_a_valid_assessment_only_run():
    # the default assimilation.freeze_backbone_rounds=0 once refused federation.rounds=0
    from strategies.preflight import prepare_config

    cfg = compose_config("federation.rounds=0")
    check_config(cfg)
    prepare_config(cfg)


@pytest.mark.parametrize("module", ["fedmed.datasets", "fedmed.defenses", "fedmed.poisoning"])
def test_the_configuration_imports_without_torch(module):
    # the registries' options are composed and checked before any model code is needed; their
    # torch code is imported inside the functions that train or evaluate
    code = f"import sys, {module}; assert 'torch' not in sys.modules, '{module} imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
