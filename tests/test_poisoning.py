"""Malicious clients: who attacks and when, the edge-case tail, the BadNets trigger, the
poisoned pools, the PGD / replacement / Byzantine updates, and the ClientApp's train handler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from clients.client_app import train
from clients.malicious import PoolImages, ProjectedStep, float_parameters, malicious_round, poisoned_data, update_norm
from fedmed.data import ClientShare, client_share, dataset_from_config, load_dataset
from fedmed.dataset import ArrayDataset, Split
from fedmed.job import JOB_KEY, Job, encode_job
from fedmed.models import build_model
from fedmed.packed_arrays import unpack
from fedmed.poisoning import (
    ATTACKS,
    AttackConfig,
    MaliciousClientsConfig,
    PoisoningAttack,
    attack_config,
    attack_section,
    attacks_in_round,
    backdoor_asr,
    backdoor_test_set,
    check_attack,
    malicious_ids,
    malicious_partitions,
    register,
    update_scale,
)
from fedmed.poisoning.badnets import add_trigger, add_trigger_uint8, trigger_pixels
from fedmed.poisoning.edge_case import _EDGE_CACHE, edge_case_split, edge_share, tail_distances
from fedmed.serialization import model_to_arrays
from fedmed.train import make_optimizer, train_local
from tests.helpers import compose_config

# --- who and when --------------------------------------------------------------------------------


def test_malicious_partitions_are_seeded_and_explicit_ids_win():
    first = malicious_partitions(20, 0.2, None, seed=3)
    assert first == malicious_partitions(20, 0.2, None, seed=3) == sorted(first)
    assert len(first) == 4 and len(set(first)) == 4 and all(0 <= i < 20 for i in first)
    assert malicious_partitions(20, 0.2, None, seed=4) != first  # another seed, another draw
    assert malicious_partitions(4, 0.1, None, seed=0) and len(malicious_partitions(4, 0.1, None, seed=0)) == 1
    assert malicious_partitions(10, 0.25, None, seed=0).__len__() == 3  # half rounds up
    assert malicious_partitions(10, 0.0, None, seed=0) == []
    assert malicious_partitions(10, 0.5, [7, 2, 7], seed=0) == [2, 7]
    assert malicious_partitions(10, 0.3, [], seed=0) == malicious_partitions(10, 0.3, None, seed=0)
    assert malicious_ids({"name": "none"}, 10, 0) == [] and malicious_ids(None, 10, 0) == []
    assert malicious_ids({"name": "badnets", "fraction": 0.3}, 10, 0) == malicious_partitions(10, 0.3, None, 0)


def test_attacks_in_round_follows_start_round_and_frequency():
    attack = {"name": "edge_case", "start_round": 3, "frequency": 2}
    assert [r for r in range(1, 10) if attacks_in_round(attack, r)] == [3, 5, 7, 9]
    assert [r for r in range(1, 5) if attacks_in_round({"name": "gaussian", "start_round": 1}, r)] == [1, 2, 3, 4]
    assert [r for r in range(1, 6) if attacks_in_round({"name": "gaussian"}, r)] == [3, 4, 5]  # its default
    assert not any(attacks_in_round({"name": "none"}, r) for r in range(1, 5))
    assert not any(attacks_in_round(None, r) for r in range(1, 5))


def test_update_scale():
    base = dict(num_train=1000, num_clients=10, clients_per_round=5, attacker_examples=100)
    assert update_scale({"name": "badnets"}, **base) == 1.0
    assert update_scale({"name": "badnets", "mode": "pgd"}, **base) == 1.0
    assert update_scale({"name": "badnets", "mode": "replacement"}, **base) == pytest.approx(5.0)
    assert update_scale({"name": "badnets", "mode": "replacement"}, **{**base, "attacker_examples": 50}) == 10.0
    assert update_scale({"name": "sign_flip", "scale": 3.0}, **base) == 3.0
    assert update_scale({"name": "none"}, **base) == 1.0
    # four colluding attackers among ten, five clients a round: two expected per round share it
    assert update_scale({"name": "badnets", "mode": "replacement"}, **base, num_malicious=4) == pytest.approx(2.5)
    # one attacker in the pool: expected 0.5 a round, still one when it is drawn
    assert update_scale({"name": "badnets", "mode": "replacement"}, **base, num_malicious=1) == pytest.approx(5.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "poison"}, "attack='poison'"),
        ({"noise_std": 1.0}, "attack=edge_case has no key attack.noise_std"),
        ({"eps": "wide"}, "attack.eps"),
        ({"mode": "sneaky"}, "attack.mode"),
        ({"fraction": 1.5}, "attack.fraction"),
        ({"fraction": 0.0}, "no client would attack"),
        ({"ids": [0, 9]}, "attack.ids"),
        ({"ids": [1, 1]}, "twice"),
        ({"source_class": 1, "target_class": 1}, "both 1"),
        ({"target_class": 3}, "attack.target_class=3"),
        ({"source_class": -1}, "attack.source_class=-1"),
        ({"frequency": 0}, "attack.frequency"),
        ({"start_round": 0}, "attack.start_round"),
        ({"eps": 0.0}, "attack.eps"),
        ({"project_every": 0}, "attack.project_every"),
        ({"scale": -1.0}, "attack.scale"),
        ({"tail_fraction": 0.0}, "attack.tail_fraction"),
        ({"test_fraction": 1.0}, "attack.test_fraction"),
        ({"poison_fraction": 1.0}, "attack.poison_fraction"),
    ],
)
def test_check_attack_names_the_key(overrides, match):
    attack = {"name": "edge_case", "fraction": 0.25, **overrides}
    with pytest.raises(ValueError, match=match):
        check_attack(attack, num_classes=3, num_clients=4)


def test_check_attack_accepts_every_registered_option():
    assert list(ATTACKS) == ["none", "edge_case", "badnets", "label_flip", "sign_flip", "gaussian"]
    for name in ATTACKS:
        config = check_attack(compose_config(f"attack={name}").attack, num_classes=2, num_clients=4)
        assert type(config) is ATTACKS[name].config and config.name == name
        assert attack_config(attack_section(name)) == config  # a client's job reads the same


def test_each_attack_has_only_its_own_keys():
    # a model-poisoning attack sends its update directly: it has no training mode
    with pytest.raises(ValueError, match="attack=sign_flip has no key attack.mode"):
        check_attack({"name": "sign_flip", "fraction": 0.2, "mode": "pgd"})
    with pytest.raises(ValueError, match="attack=badnets has no key attack.source_class"):
        check_attack({"name": "badnets", "source_class": 1})
    # with attack=none, a setting that would do nothing is refused, not silently ignored
    with pytest.raises(ValueError, match="attack=none has no key attack.fraction"):
        check_attack({"name": "none", "fraction": 1.5})
    with pytest.raises(Exception, match="attack.fraction"):
        compose_config("attack.fraction=0.5")
    with pytest.raises(Exception, match="attack.mode"):
        compose_config("attack=gaussian", "attack.mode=pgd")
    with pytest.raises(ValueError, match="attack=badnets has no key tail_fraction"):
        attack_section("badnets", tail_fraction=0.2)
    with pytest.raises(ValueError, match="noise_std"):
        check_attack({"name": "gaussian", "fraction": 0.2, "noise_std": 0.0})
    with pytest.raises(ValueError, match="trigger_size"):
        check_attack({"name": "badnets", "fraction": 0.2, "trigger_size": 0})


# --- edge-case tail on real data -----------------------------------------------------------------


def test_edge_case_tail_of_pneumonia_is_the_far_end_of_its_class(medmnist_root):
    data = load_dataset("pneumoniamnist", seed=0, root=str(medmnist_root))
    images, labels = data.train.images, data.train.labels
    split = edge_case_split(images, labels, source_class=0, tail_fraction=0.1, test_fraction=0.5, seed=0)
    source = np.flatnonzero(labels == 0)
    assert len(split.attacker) + len(split.test) == round(0.1 * len(source)) == 121
    assert abs(len(split.attacker) - len(split.test)) <= 1
    assert np.all(labels[split.held_out] == 0)
    assert not np.intersect1d(split.attacker, split.test).size
    _EDGE_CACHE.clear()
    again = edge_case_split(images, labels, 0, 0.1, 0.5, seed=0)
    assert np.array_equal(again.attacker, split.attacker) and np.array_equal(again.test, split.test)
    indices, distances = tail_distances(images, labels, 0, seed=0)
    tail = np.isin(indices, split.held_out)
    assert distances[tail].min() > distances[~tail].max()
    assert distances[tail].mean() > 1.5 * distances[~tail].mean()


def test_honest_shares_never_hold_the_edge_case_images(medmnist_root):
    cfg = compose_config(
        "dataset=pneumoniamnist",
        f"dataset.root={medmnist_root}",
        "attack=edge_case",
        "attack.ids=[1]",
        "federation.num_clients=3",
    )
    job = Job.from_config(cfg)
    data = load_dataset("pneumoniamnist", seed=0, root=str(medmnist_root))
    split = edge_case_split(data.train.images, data.train.labels, 1, 0.1, 0.5, seed=0)
    held = split.held_out
    seen = []
    for pid in range(3):
        share = client_share(job, pid, 3)
        assert not np.isin(share.train_indices, held).any() and not np.isin(share.val_indices, held).any()
        seen += [share.train_indices, share.val_indices]
    assert np.array_equal(np.sort(np.concatenate(seen + [held])), np.arange(len(data.train.labels)))
    # with no attack, the same partitions hold the tail again
    job.attack = attack_config({"name": "none"})
    assert sum(np.isin(client_share(job, pid, 3).train_indices, held).sum() for pid in range(3)) > 0
    # the server's backdoor test set is the held-out half, labelled with the source class
    test_set = backdoor_test_set(data, cfg.attack, seed=0)
    assert len(test_set) == len(split.test) and np.all(test_set.labels == 1) and test_set.target == 0
    assert np.array_equal(test_set.images, data.train.images[split.test])


# --- BadNets trigger -----------------------------------------------------------------------------


def test_trigger_is_a_bordered_white_square_in_the_bottom_right_corner():
    x = torch.full((2, 3, 28, 28), 0.5)
    stamped = add_trigger(x)
    assert torch.equal(x, torch.full((2, 3, 28, 28), 0.5))  # the input is not touched
    assert stamped.min() >= 0 and stamped.max() <= 1
    assert torch.all(stamped[..., 24:27, 24:27] == 1.0)  # 3 px square, 1 px border
    box = stamped[..., 23:28, 23:28].clone()
    box[..., 1:4, 1:4] = 0.0
    assert torch.all(box == 0.0)
    assert torch.all(stamped[..., :23, :] == 0.5) and torch.all(stamped[..., :, :23] == 0.5)
    assert (stamped != x).sum() == 2 * 3 * 25
    uint8 = add_trigger_uint8(np.full((2, 28, 28, 3), 128, np.uint8))
    assert np.array_equal(uint8[:, 23:, 23:, :], (stamped[..., 23:, 23:].permute(0, 2, 3, 1) * 255).byte().numpy())
    assert trigger_pixels(64) == (7, 2) and trigger_pixels(224, 3) == (24, 8)
    assert torch.all(add_trigger(torch.zeros(1, 1, 64, 64))[..., 64 - 2 - 7 : 62, 64 - 2 - 7 : 62] == 1.0)
    with pytest.raises(ValueError, match="trigger_size"):
        add_trigger(torch.zeros(1, 1, 8, 8), trigger_size=30)


def test_badnets_backdoor_test_set_and_asr():
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 200, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 3, n))

    data = ArrayDataset("toy", split(30), split(10), split(40), ("a", "b", "c"))
    test_set = backdoor_test_set(data, {"name": "badnets", "target_class": 2}, seed=0)
    assert len(test_set) == int((data.test.labels != 2).sum()) and np.all(test_set.labels != 2)
    assert np.all(test_set.images[:, 24:27, 24:27] == 255)
    flip = backdoor_test_set(data, {"name": "label_flip", "source_class": 0, "target_class": 1}, seed=0)
    assert np.all(flip.labels == 0) and len(flip) == int((data.test.labels == 0).sum()) and flip.target == 1
    assert backdoor_test_set(data, {"name": "sign_flip"}, seed=0) is None
    assert backdoor_test_set(data, None, seed=0) is None

    class Always(nn.Module):  # predicts class 2 whenever the bottom-right corner is white
        def forward(self, x):
            hit = (x[:, 0, 25, 25] > 0.99).float()
            return torch.stack([1 - hit, torch.zeros_like(hit), hit], 1)

    assert backdoor_asr(Always(), test_set, 8, torch.device("cpu")) == 1.0
    assert backdoor_asr(Always(), flip, 8, torch.device("cpu")) == 0.0


# --- poisoned pools ------------------------------------------------------------------------------


def toy_share(n: int = 120, num_classes: int = 3, seed: int = 0) -> ClientShare:
    """Class-dependent brightness plus noise, 16 px, one channel; the client holds 0..n/2-1."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    images = np.clip(labels[:, None, None, None] * 70 + rng.normal(40, 25, (n, 16, 16, 1)), 0, 255).astype(np.uint8)
    return ClientShare(images, labels, np.arange(n // 2), np.zeros(0, np.int64), num_classes, None)


def test_badnets_pool_has_the_poisoned_share_and_labels():
    share = toy_share()
    attack = {"name": "badnets", "target_class": 2, "poison_fraction": 0.5}
    data = poisoned_data(share, attack, partition_id=0, malicious=[0], seed=1, run_seed=0)
    clean = len(share.train_indices)
    assert len(data.indices) == 2 * clean and isinstance(data.images, PoolImages)
    assert data.images.shape == (2 * clean, 16, 16, 1)
    poisoned = data.images[np.arange(clean, 2 * clean)]
    assert np.all(poisoned[:, 13:15, 13:15] == 255) and np.all(data.labels[clean:] == 2)
    rows = data.images.rows[clean:]
    assert np.all(share.labels[rows] != 2) and np.isin(rows, share.train_indices).all()
    assert np.array_equal(data.images[np.arange(clean)], share.images[share.train_indices])
    assert np.array_equal(data.labels[:clean], share.labels[share.train_indices])
    smaller = poisoned_data(
        share, {**attack, "poison_fraction": 0.2}, partition_id=0, malicious=[0], seed=1, run_seed=0
    )
    assert (smaller.labels[clean:] == 2).all() and len(smaller.indices) - clean == round(clean / 4)


def test_label_flip_and_edge_case_pools():
    share = toy_share()
    flip = poisoned_data(
        share,
        {"name": "label_flip", "source_class": 1, "target_class": 0},
        partition_id=0,
        malicious=[0],
        seed=1,
        run_seed=0,
    )
    own = share.labels[share.train_indices]
    assert len(flip.indices) == len(share.train_indices)
    assert np.array_equal(flip.labels, np.where(own == 1, 0, own))

    attack = {"name": "edge_case", "source_class": 1, "target_class": 0, "tail_fraction": 0.5, "poison_fraction": 0.2}
    split = edge_case_split(share.images, share.labels, 1, 0.5, 0.5, seed=0)
    mine = edge_share(split, [0, 3], 3)
    assert len(mine) and np.isin(mine, split.attacker).all()
    assert not np.intersect1d(mine, edge_share(split, [0, 3], 0)).size
    data = poisoned_data(share, attack, partition_id=3, malicious=[0, 3], seed=1, run_seed=0)
    clean = len(share.train_indices)
    poison_rows = data.images.rows[clean:]
    assert len(poison_rows) == round(clean * 0.25) and set(poison_rows) == set(mine)  # repeated to fill
    assert np.all(data.labels[clean:] == 0) and np.all(share.labels[poison_rows] == 1)


# --- what an attacker sends ----------------------------------------------------------------------


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def attack_job(name: str = "badnets", **attack) -> Job:
    if name == "badnets":
        attack = {"target_class": 2, **attack}
    return Job.from_plain(
        {
            "attack": attack_section(name, **{"fraction": 0.5, **attack}),
            "client": {
                "optimizer": "sgd",
                "lr": 0.5,
                "momentum": 0.0,
                "weight_decay": 0.0,
                "epochs": 2,
                "batch_size": 8,
                "augment": False,
            },
            "num_clients": 2,
            "clients_per_round": 2,
            "seed": 0,
        }
    )


def run_attack(job: dict, share: ClientShare | None = None) -> tuple[list[torch.Tensor], nn.Module]:
    model = tiny_model()
    reference = [p.detach().clone() for p in float_parameters(model)]
    malicious_round(model, share or toy_share(), job, partition_id=0, seed=5, device=torch.device("cpu"))
    return [p.detach() - r for p, r in zip(float_parameters(model), reference)], model


def test_pgd_keeps_the_update_in_the_ball_and_replacement_scales_it(one_thread):
    blackbox, _ = run_attack(attack_job())
    free = float(torch.sqrt(sum((u**2).sum() for u in blackbox)))
    eps = free / 4
    pgd, _ = run_attack(attack_job(mode="pgd", eps=eps, project_every=3))
    norm = float(torch.sqrt(sum((u**2).sum() for u in pgd)))
    assert norm <= eps + 1e-5 and norm > 0.9 * eps
    replaced, _ = run_attack(attack_job(mode="replacement", eps=eps, project_every=3, scale=3.0))
    for r, p in zip(replaced, pgd):
        torch.testing.assert_close(r, 3 * p, rtol=1e-4, atol=1e-6)
    # scale None in replacement mode: a round's examples over the attacker's (2 clients of 60: 2)
    auto, _ = run_attack(attack_job(mode="replacement", eps=eps, project_every=3))
    for a, p in zip(auto, pgd):
        torch.testing.assert_close(a, 2 * p, rtol=1e-4, atol=1e-6)


def test_projected_step_projects_before_every_kth_step():
    param = nn.Parameter(torch.zeros(3))
    reference = [torch.zeros(3)]
    calls = []

    def inner(model, x, y):
        calls.append(float(param.detach().norm()))
        return torch.tensor(0.0), None

    step = ProjectedStep([param], reference, eps=1.0, every=2, inner=inner)
    for _ in range(5):
        step(None, None, None)
        with torch.no_grad():
            param.add_(3.0)  # the optimizer's step
    assert step.projections == 2  # before calls 3 and 5
    assert calls[2] == pytest.approx(1.0) and calls[4] == pytest.approx(1.0) and calls[1] > 1.0
    step.finish()
    assert update_norm([param], reference) == pytest.approx(1.0)


def honest_update(share: ClientShare, job: dict) -> tuple[list[torch.Tensor], nn.Module]:
    model = tiny_model()
    reference = [p.detach().clone() for p in float_parameters(model)]
    client = job.client
    optimizer = make_optimizer(model.parameters(), "sgd", client.lr, 0.0, 0.0)
    train_local(
        model,
        share.images,
        share.labels,
        share.train_indices,
        epochs=client.epochs,
        batch_size=client.batch_size,
        optimizer=optimizer,
        device=torch.device("cpu"),
        seed=5,
    )
    return [p.detach() - r for p, r in zip(float_parameters(model), reference)], model


def test_sign_flip_sends_the_negated_honest_update_and_keeps_batchnorm_statistics(one_thread):
    share = toy_share()
    honest, honest_model = honest_update(share, attack_job())
    flipped, flipped_model = run_attack(attack_job("sign_flip", scale=2.0), share)
    for f, h in zip(flipped, honest):
        torch.testing.assert_close(f, -2 * h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(flipped_model[1].running_mean, honest_model[1].running_mean)
    assert not torch.equal(flipped_model[1].running_mean, torch.zeros(4))


def test_gaussian_sends_seeded_noise(one_thread):
    updates, model = run_attack(attack_job("gaussian", noise_std=0.3))
    flat = torch.cat([u.reshape(-1) for u in updates])
    assert abs(float(flat.mean())) < 0.1 and 0.2 < float(flat.std()) < 0.4
    again, _ = run_attack(attack_job("gaussian", noise_std=0.3))
    assert all(torch.equal(a, b) for a, b in zip(updates, again))
    assert not torch.equal(model[1].running_mean, torch.zeros(4))  # as training left them


# --- the ClientApp's train handler ---------------------------------------------------------------


pytest_task = pytest.mark.usefixtures("task_identity")


def client_job(*overrides: str) -> Job:
    cfg = compose_config(
        "dataset.n_train=120",
        "dataset.n_val=30",
        "dataset.n_test=30",
        "federation.num_clients=2",
        "client.batch_size=16",
        "client.augment=false",
        *overrides,
    )
    job = Job.from_config(cfg)
    job.num_classes = 3
    return job


def train_message(job: dict, model: nn.Module, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": model_to_arrays(model),
            "config": ConfigRecord({JOB_KEY: encode_job(job), "server-round": server_round}),
        }
    )
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def train_reply(job: dict, model: nn.Module, pid: int, server_round: int = 1) -> tuple[dict, dict]:
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": pid, "num-partitions": 2}, state=RecordDict(), run_config={}
    )
    reply = train(train_message(job, model, server_round), context)
    arrays = {k: v.numpy() for k, v in unpack(reply.content["arrays"]).items()}
    return arrays, dict(reply.content["metrics"])


@pytest_task
def test_train_handler_attacks_only_on_malicious_partitions_in_attack_rounds(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1)
    sent = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    params = [k for k, _ in model.named_parameters()]
    attacked = ("attack=sign_flip", "attack.ids=[1]", "attack.start_round=2")

    honest, honest_metrics = train_reply(client_job(), model, pid=1, server_round=2)
    flipped, flipped_metrics = train_reply(client_job(*attacked), model, pid=1, server_round=2)
    for key in params:
        np.testing.assert_allclose(flipped[key] - sent[key], -(honest[key] - sent[key]), rtol=1e-3, atol=1e-6)
    assert set(flipped_metrics) == set(honest_metrics)  # nothing in the reply gives it away
    assert flipped_metrics["num-examples"] == honest_metrics["num-examples"]

    before_start, _ = train_reply(client_job(*attacked), model, pid=1, server_round=1)
    other, _ = train_reply(client_job(*attacked), model, pid=0, server_round=2)
    other_honest, _ = train_reply(client_job(), model, pid=0, server_round=2)
    honest_round1, _ = train_reply(client_job(), model, pid=1, server_round=1)
    for key in params:
        np.testing.assert_array_equal(before_start[key], honest_round1[key])
        np.testing.assert_array_equal(other[key], other_honest[key])


@pytest_task
def test_train_handler_runs_an_edge_case_pgd_attack(one_thread):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1)
    sent = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    job = client_job(
        "attack=edge_case",
        "attack.ids=[0]",
        "attack.start_round=1",
        "attack.mode=pgd",
        "attack.eps=0.5",
        "attack.tail_fraction=0.3",
    )
    arrays, metrics = train_reply(job, model, pid=0)
    norm = np.sqrt(sum(((arrays[k] - sent[k]) ** 2).sum() for k, _ in model.named_parameters()))
    assert 0 < norm <= 0.5 + 1e-5
    assert np.isfinite(metrics["train_loss"])
    # the attacker reports its clean share, which lacks the tail like everyone's
    data = dataset_from_config(job.dataset, 0)
    split = edge_case_split(data.train.images, data.train.labels, 1, 0.3, 0.5, seed=0)
    share = client_share(job, 0, 2)
    assert metrics["num-examples"] == len(share.train_indices)
    assert not np.isin(share.train_indices, split.held_out).any()


def test_attack_section_fills_defaults():
    section = attack_section("badnets")
    assert section["mode"] == "blackbox" and section["eps"] == 2.0 and section["ids"] is None
    assert attack_section("none") == {"name": "none"} and attack_config(None).name == "none"
    assert attack_section("edge_case", fraction=0.5)["fraction"] == 0.5
    assert attack_config(compose_config("attack=edge_case").attack).poison_fraction == 0.2


def test_a_new_attack_is_one_registration(monkeypatch, one_thread):
    """An attack registered from outside the package composes, is checked, and runs in a client."""
    from dataclasses import dataclass

    from hydra.core.config_store import ConfigStore

    from fedmed.config import register_configs

    @dataclass
    class ZeroUpdateConfig(MaliciousClientsConfig):
        name: str = "zero_update"
        factor: float = 0.0

        def check(self, num_classes=None, num_clients=None):
            super().check(num_classes, num_clients)
            if self.factor < 0:
                raise ValueError(f"attack.factor={self.factor} must be >= 0")

    def update(config, trained, reference, *, seed, scale):
        return [(t - r) * config.factor for t, r in zip(trained, reference)]

    monkeypatch.delitem(ATTACKS, "zero_update", raising=False)
    register(PoisoningAttack("zero_update", ZeroUpdateConfig, update=update))
    try:
        register_configs()
        cfg = compose_config("attack=zero_update", "attack.factor=0.5", "attack.ids=[0]")
        assert isinstance(check_attack(cfg.attack), ZeroUpdateConfig)
        with pytest.raises(ValueError, match="attack.factor=-1"):
            check_attack({**dict(cfg.attack), "factor": -1.0})
        half, _ = run_attack(attack_job("zero_update", factor=0.5))
        honest, _ = run_attack(attack_job("zero_update", factor=1.0))
        for h, u in zip(half, honest):
            torch.testing.assert_close(h, 0.5 * u, rtol=1e-4, atol=1e-7)
    finally:
        del ATTACKS["zero_update"]
        ConfigStore.instance().repo["attack"].pop("zero_update.yaml", None)


def test_attack_configs_are_typed_dataclasses():
    for attack in ATTACKS.values():
        assert issubclass(attack.config, AttackConfig)
        assert attack.config().name == attack.name


def test_a_run_folder_from_the_flat_attack_schema_resumes_with_its_attacks_keys(tmp_path):
    from omegaconf import OmegaConf

    from fedmed.checkpoint import resumed_config

    flat = {  # every attack's keys, as config.yaml held them before the registry
        "name": "badnets",
        "fraction": 0.2,
        "ids": None,
        "mode": "pgd",
        "frequency": 1,
        "start_round": 2,
        "source_class": 0,
        "target_class": 1,
        "eps": 2.0,
        "project_every": 10,
        "scale": None,
        "tail_fraction": 0.1,
        "test_fraction": 0.5,
        "poison_fraction": 0.5,
        "trigger_size": 3,
        "noise_std": 1.0,
    }
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"attack": flat, "defense": {"name": "none"}, "seed": 0}))
    saved = resumed_config(tmp_path, compose_config(), [])
    dropped = {"source_class", "tail_fraction", "test_fraction", "noise_std"}  # badnets never read them
    assert OmegaConf.to_container(saved.attack) == {k: v for k, v in flat.items() if k not in dropped}
    assert check_attack(saved.attack).mode == "pgd"
