"""The same seed gives the same metrics when every source of randomness is in play at once:
DP-SGD noise and Poisson sampling, random-start adversarial training, FLAME's noise on the
aggregate, and an attacker's Gaussian update from its start round; whichever way the models travel
to the clients and wherever Ray places them."""

import json

import pytest

from fedmed.runner import run
from tests.helpers import BOUNDED_WAITS, compose_config
from tests.test_end_to_end import without_timings

pytestmark = pytest.mark.slow

EVERY_SOURCE = (
    "federation.num_clients=4",
    "federation.clients_per_round=4",
    "federation.rounds=2",
    "dataset.n_train=120",
    "dataset.n_test=60",
    "eval.attacks=[pgd]",
    "eval.eps=[0.0314]",
    "eval.max_samples=16",
    "defense=dp_sgd",
    "defense.adversarial=fast_at",
    "strategy=flame",
    "attack=gaussian",
    "attack.ids=[3]",
    "attack.start_round=2",
    "progress=false",
)


def metrics(out, seed, *overrides):
    run(compose_config(*EVERY_SOURCE, *BOUNDED_WAITS, f"seed={seed}", f"output_dir={out}", *overrides), out)
    return [without_timings(json.loads(line)) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_metrics_with_every_source_of_noise(tmp_path, on_cluster):
    first = metrics(tmp_path / "a", 3)
    # every source was active: DP noise spent budget, FLAME scored the round the attacker sent noise
    assert first[2]["privacy/epsilon"] > 0
    assert first[2]["detection/tpr"] is not None and "3" in first[2]["detection/scores"]
    # the first run's models travel as files in /dev/shm (a Ray of its own: auto); the same seed on
    # a two-node Ray cluster, with the models inside Flower's messages (auto there): neither the
    # transport nor the placement changes a number
    assert metrics(tmp_path / "b", 3, *on_cluster) == first
    # another seed, one round: its first training round already differs
    other = metrics(tmp_path / "c", 4, *on_cluster, "federation.rounds=1")
    assert other[1] != first[1]
