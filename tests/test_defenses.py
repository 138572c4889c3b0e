"""Client-side defences: configuration rules, adversarial-training steps, distillation, DP-SGD."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from omegaconf import OmegaConf
from opacus.validators import ModuleValidator

from clients.local_training import LocalData, train_round
from fedmed.config import ClientConfig
from fedmed.defenses import (
    DEFENSES,
    Defense,
    DefenseConfig,
    LocalRound,
    check_defense,
    defense_section,
    model_norm_for,
    register,
)
from fedmed.defenses.steps import AdversarialTraining, SoftLabelStep, round_eps
from fedmed.job import Job
from fedmed.models import build_model
from fedmed.synthetic import make_synthetic
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def defense(name: str, **changes) -> dict:
    return defense_section(name, **changes)


@pytest.fixture(scope="module")
def small_data():
    data = make_synthetic(num_classes=3, channels=1, size=28, n_train=96, n_val=8, n_test=8, seed=0)
    return LocalData(data.train.images, data.train.labels, np.arange(96))


@pytest.fixture(scope="module")
def dp_data(small_data):
    """Half of ``small_data``, three DP-SGD steps a round: Opacus's per-example gradients make
    each step several times a plain one, and these tests are about the accountant."""
    return LocalData(small_data.images, small_data.labels, small_data.indices[:48])


@pytest.mark.parametrize("name", ["none", "fgsm_at", "fast_at", "pgd_at", "distillation", "dp_sgd"])
def test_every_defense_is_an_option_with_its_own_keys(name):
    cfg = compose_config(f"defense={name}")
    assert cfg.defense.name == name
    assert list(cfg.defense) == list(defense_section(name))
    check_defense(cfg.defense)


def test_the_registry_holds_every_defense_and_composes_each_with_its_defaults():
    assert list(DEFENSES) == ["none", "fgsm_at", "fast_at", "pgd_at", "distillation", "dp_sgd"]
    assert compose_config("defense=fgsm_at").defense.clean_weight == 0.5
    assert compose_config("defense=distillation").defense.temperature == 20.0
    assert compose_config("defense=dp_sgd").defense.noise_multiplier == 1.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["defense.eps=0.1"], "defense.eps"),  # defense=none has no epsilon
        (["defense=fgsm_at", "defense.steps=3"], "defense.steps"),  # only pgd_at (and dp_sgd) take steps
        (["defense=fast_at", "defense.temperature=3"], "defense.temperature"),
        (["defense=fgsm_at", "defense.eps=abc"], "defense.eps"),
        (["defense=fgsm"], "fgsm_at"),  # Hydra lists the options
    ],
)
def test_a_key_the_chosen_defense_does_not_have_is_a_hydra_error_naming_it(overrides, message):
    with pytest.raises(Exception, match=message):
        compose_config(*overrides)


def test_a_client_job_with_a_key_its_defense_does_not_have_is_refused_by_name():
    with pytest.raises(ValueError, match="defense=fast_at has no key defense.temperature"):
        check_defense({"name": "fast_at", "temperature": 3.0})
    with pytest.raises(ValueError, match="defense=none has no key eps"):
        defense_section("none", eps=0.1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "fgsm"}, "defense='fgsm' is not known"),
        ({"name": "dp_sgd", "noise_multiplier": None}, "exactly one of defense.noise_multiplier"),
        ({"name": "dp_sgd", "noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one"),
        ({"name": "fast_at", "adversarial": "pgd_at"}, "defense=fast_at has no key defense.adversarial"),
        ({"name": "dp_sgd", "eps": -1.0, "adversarial": "pgd_at"}, "defense.eps=-1.0 must be > 0"),
        ({"name": "pgd_at", "steps": 0}, "defense.steps=0 must be >= 1"),
        ({"name": "dp_sgd", "noise_multiplier": 1.0, "adversarial": "distillation"}, "cannot run under DP-SGD"),
        (
            {"name": "dp_sgd", "noise_multiplier": 1.0, "adversarial": "fgsm_at", "clean_weight": 0.5},
            "defense.clean_weight=0",
        ),
        ({"name": "pgd_at", "eps": 0.0}, "defense.eps=0.0 must be > 0"),
        ({"name": "fgsm_at", "clean_weight": 1.5}, "defense.clean_weight=1.5"),
        ({"name": "distillation", "mode": "online"}, "defense.mode='online'"),
        ({"name": "distillation", "temperature": 0.0}, "defense.temperature=0.0"),
    ],
)
def test_impossible_defense_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_defense(changes)


def test_dp_sgd_turns_batchnorm_into_groupnorm_for_every_architecture():
    assert model_norm_for("batch", "dp_sgd") == "group"
    assert model_norm_for("batch", "fast_at") == "batch"
    for name in ("resnet18", "mobilenet_v2", "densenet121", "resnet50"):
        model = build_model(name, 2, 1, norm=model_norm_for("batch", "dp_sgd"))
        assert ModuleValidator.validate(model, strict=False) == [], name
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()), name


def test_epsilon_warm_up_grows_linearly_then_stays():
    assert [round_eps(0.04, r, 4) for r in (1, 2, 4, 9)] == pytest.approx([0.01, 0.02, 0.04, 0.04])
    assert round_eps(0.04, 1, 0) == 0.04


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 3)
    )


@pytest.mark.parametrize("method", ["fgsm", "fast", "pgd"])
def test_adversarial_batch_stays_in_the_eps_ball_and_in_pixel_range(method, small_data):
    x = torch.from_numpy(small_data.images[:16]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(small_data.labels[:16].astype(np.int64))
    model = tiny_model()
    step = AdversarialTraining(method, 8 / 255, steps=3, generator=torch.Generator().manual_seed(0))
    x_adv = step.perturb(model, x, y)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in model.parameters())  # the search leaves no parameter gradient
    # the attack raises the loss it was built against
    assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_fgsm_training_step_reuses_the_clean_pass_without_changing_the_gradient(small_data):
    x = torch.from_numpy(small_data.images[:16]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(small_data.labels[:16].astype(np.int64))
    eps, w = 4 / 255, 0.3
    model = tiny_model()
    loss, _ = AdversarialTraining("fgsm", eps, clean_weight=w)(model, x, y)
    fused = [p.grad.clone() for p in model.parameters()]
    # the same loss written out plainly: attack first, then both losses
    reference = tiny_model()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(reference(x_req), y), x_req)
    x_adv = (x + eps * grad.sign()).clamp(0, 1)
    plain = w * F.cross_entropy(reference(x), y) + (1 - w) * F.cross_entropy(reference(x_adv), y)
    plain.backward()
    assert float(loss) == pytest.approx(float(plain), rel=1e-5)
    for got, want in zip(fused, (p.grad for p in reference.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_soft_labels_of_an_identical_teacher_cost_nothing(small_data):
    x = torch.from_numpy(small_data.images[:16]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(small_data.labels[:16].astype(np.int64))
    model, teacher = tiny_model(), tiny_model()
    loss, _ = SoftLabelStep(teacher, temperature=5.0, soft_weight=1.0)(model, x, y)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())
    other = SoftLabelStep(
        tiny_model().apply(lambda m: torch.nn.init.normal_(m.weight) if hasattr(m, "weight") else None),
        temperature=5.0,
        soft_weight=1.0,
    )
    assert float(other(tiny_model(), x, y)[0]) > 0.01


def job_for(defense_values: dict, rounds: int = 3) -> dict:
    client = OmegaConf.to_container(OmegaConf.structured(ClientConfig))
    client.update(batch_size=16, augment=False)
    return Job.from_plain({"defense": defense_values, "client": client, "rounds": rounds})


@pytest.mark.parametrize(
    "changes",
    [
        {"name": "fgsm_at", "clean_weight": 0.5},
        {"name": "fast_at"},
        {"name": "pgd_at", "steps": 2},
        {"name": "distillation", "temperature": 10.0},
        {"name": "distillation", "mode": "federated", "temperature": 4.0},
    ],
)
def test_each_defense_trains_and_reports(changes, small_data):
    model = build_model("resnet18", 3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_round(
        model,
        small_data,
        job_for(defense(**changes)),
        server_round=1,
        seed=0,
        device=torch.device("cpu"),
        state=RecordDict(),
    )
    assert np.isfinite(metrics["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if changes["name"].endswith("_at"):
        assert 0 <= metrics["train_pgd_accuracy"] <= 1 and 0 <= metrics["train_fgsm_accuracy"] <= 1


@pytest.mark.parametrize("adversarial", [None, "fast_at"])
def test_dp_sgd_epsilon_grows_across_rounds_through_the_client_state(adversarial, dp_data):
    model = build_model("resnet18", 3, 1, norm="group")
    state = RecordDict()
    job = job_for(defense(name="dp_sgd", noise_multiplier=1.0, adversarial=adversarial))
    spent = [
        train_round(model, dp_data, job, server_round=r, seed=r, device=torch.device("cpu"), state=state)[
            "privacy_epsilon"
        ]
        for r in (1, 2)
    ]
    assert 0 < spent[0] < spent[1]
    # the per-example hooks come off: the cached model is plain again for the next round
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_dp_sgd_target_epsilon_is_spent_over_all_rounds(dp_data):
    model = build_model("resnet18", 3, 1, norm="group")
    state = RecordDict()
    job = job_for(defense(name="dp_sgd", target_epsilon=4.0, noise_multiplier=None), rounds=2)
    spent = [
        train_round(model, dp_data, job, server_round=r, seed=r, device=torch.device("cpu"), state=state)[
            "privacy_epsilon"
        ]
        for r in (1, 2)
    ]
    assert spent[0] < spent[1] <= 4.0 * 1.02  # Opacus searches the noise to within its tolerance
    assert spent[1] > 4.0 * 0.9


@dataclass
class _ScaledLossConfig(DefenseConfig):
    name: str = "scaled_loss"
    factor: float = 0.5

    def check(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"defense.factor={self.factor} must be > 0")


def _train_with_scaled_loss(config: _ScaledLossConfig, local_round: LocalRound) -> dict[str, float]:
    def step(model, x, y):
        logits = model(x)
        loss = config.factor * F.cross_entropy(logits, y)
        loss.backward()
        return loss.detach(), logits.detach()

    result = local_round.train(step)
    return {"train_loss": result["loss"], "train_accuracy": result["accuracy"], "factor": config.factor}


@pytest.fixture
def scaled_loss_defence():
    from hydra.core.config_store import ConfigStore

    register(Defense("scaled_loss", _ScaledLossConfig, _train_with_scaled_loss))
    ConfigStore.instance().store(group="defense", name="scaled_loss", node=_ScaledLossConfig)
    yield
    del DEFENSES["scaled_loss"]
    ConfigStore.instance().repo["defense"].pop("scaled_loss.yaml")


def test_a_new_defence_is_one_config_one_train_and_its_registration(scaled_loss_defence, small_data):
    cfg = compose_config("defense=scaled_loss", "defense.factor=0.25")
    check_defense(cfg.defense)
    with pytest.raises(ValueError, match="defense.factor=-1.0 must be > 0"):
        check_defense({"name": "scaled_loss", "factor": -1.0})
    model = build_model("resnet18", 3, 1)
    job = job_for(OmegaConf.to_container(cfg.defense))
    metrics = train_round(
        model, small_data, job, server_round=1, seed=0, device=torch.device("cpu"), state=RecordDict()
    )
    assert metrics["factor"] == 0.25 and np.isfinite(metrics["train_loss"])
