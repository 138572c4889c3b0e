"""Each defence in a whole 2-round, 3-client federation on the test run's Ray cluster, and the
robustness keys of the contract in metrics.jsonl."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmed.adversarial_eval import eps_key
from fedmed.runner import run
from tests.helpers import BOUNDED_WAITS, compose_config

pytestmark = pytest.mark.slow

SMALL = (
    "federation.num_clients=3",
    "federation.clients_per_round=3",
    "federation.rounds=2",
    "dataset.n_train=240",
    "dataset.n_test=90",
    "eval.max_samples=32",
    "eval.every=2",
    "progress=false",
)


def federation(tmp_path, *overrides):
    cfg = compose_config(*SMALL, *BOUNDED_WAITS, f"output_dir={tmp_path}", *overrides)
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, rows


def test_robustness_keys_follow_the_contract(tmp_path, on_cluster):
    cfg, summary, rows = federation(tmp_path, *on_cluster, "defense=fast_at")
    expected = {
        f"adv/{attack}/{eps_key(eps)}/{metric}"
        for attack in ("fgsm", "pgd")
        for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255)
        for metric in ("accuracy", "balanced_accuracy", "auc", "success_rate")
    }
    assert list(cfg.eval.attacks) == ["fgsm", "pgd"]
    assert "adv/fgsm/0.0314/accuracy" in rows[2]  # the contract's own spelling of 8/255
    # assessed at round 0 and at the last round (eval.every=2), not in between
    assert expected <= set(rows[0]) and expected <= set(rows[2])
    assert not any(k.startswith("adv/") for k in rows[1])
    for key in expected:
        if key.endswith("accuracy"):
            assert 0 <= rows[2][key] <= 1
    assert rows[2]["adv/none/0.0000/balanced_accuracy"] is not None
    # every client assessed its own validation share; the weakest is in the row
    assert [c["partition-id"] for c in rows[2]["client_eval"]] == [0, 1, 2]
    worst = rows[2]["adv/pgd/0.0314/worst_client_accuracy"]
    assert worst == min(c["val_adv/pgd/0.0314/accuracy"] for c in rows[2]["client_eval"])
    assert all("train_pgd_accuracy" in c for c in rows[2]["clients"])
    assert summary["final"]["adv/pgd/0.0314/accuracy"] == rows[2]["adv/pgd/0.0314/accuracy"]
    for name in ("robustness_per_round.png", "robustness_vs_eps.png"):
        assert (tmp_path / "plots" / name).is_file()


ONE_ATTACK = ("eval.attacks=[fgsm]", "eval.eps=[0.0314]")


@pytest.fixture(scope="module")
def undefended(tmp_path_factory, on_cluster):
    """The same federation and seed with plain local training: what each defence must change."""
    out = tmp_path_factory.mktemp("undefended")
    _, _, rows = federation(out, *on_cluster, *ONE_ATTACK)
    return rows, load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize(
    "overrides, reports_robust_check",
    [
        (("defense=fgsm_at",), True),
        (("defense=pgd_at", "defense.steps=2"), True),
        (("defense=distillation",), False),
        (("defense=distillation", "defense.mode=federated", "defense.temperature=4"), False),
    ],
)
def test_defense_changes_the_training_in_a_federation(
    tmp_path, on_cluster, undefended, overrides, reports_robust_check
):
    _, summary, rows = federation(tmp_path, *on_cluster, *ONE_ATTACK, *overrides)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [c["partition-id"] for c in rows[2]["clients"]] == [0, 1, 2]
    assert rows[2]["rejected"] == []
    assert 0 <= rows[2]["adv/fgsm/0.0314/accuracy"] <= 1
    # the clients really trained with the defence: same seed, same data order, other losses and model
    plain_rows, plain_model = undefended
    assert rows[0]["accuracy"] == plain_rows[0]["accuracy"]  # the same initial model
    for ours, plain in zip(rows[1]["clients"], plain_rows[1]["clients"]):
        assert ours["partition-id"] == plain["partition-id"]
        assert ours["train_loss"] != plain["train_loss"]
    model = load_file(str(tmp_path / "model.safetensors"))
    assert any(not torch.equal(model[k], plain_model[k]) for k in plain_model)
    # adversarial training measures its clients' robustness on training images; distillation doesn't
    assert all(("train_pgd_accuracy" in c) == reports_robust_check for c in rows[2]["clients"])
    assert summary["final"]["accuracy"] == rows[2]["accuracy"]


def test_dp_sgd_federation_reports_growing_epsilon_with_groupnorm(tmp_path, on_cluster):
    cfg, _, rows = federation(
        tmp_path,
        *on_cluster,
        "defense=dp_sgd",
        "defense.adversarial=fast_at",
        "eval.attacks=[fgsm]",
        "eval.eps=[0.0314]",
        "model.norm=batch",
    )
    written = (tmp_path / "config.yaml").read_text()
    assert "norm: group" in written  # BatchNorm was converted for clients and server alike
    assert "privacy/epsilon" not in rows[0]
    spent = [rows[1]["privacy/epsilon"], rows[2]["privacy/epsilon"]]
    assert 0 < spent[0] < spent[1]
    assert spent[1] == max(c["privacy_epsilon"] for c in rows[2]["clients"])
