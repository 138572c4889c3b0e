"""Tests for fedmed.evasion and fedmed.adversarial_eval: bounds, strength, agreement with torchattacks,
targeted mode, side effects on the model, seeding, names, and the robustness assessment."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

import fedmed.evasion as attacks
from fedmed.adversarial_eval import assess_robustness, eps_key, fixed_subset
from fedmed.evasion import ATTACK_NAMES, ATTACKS, EvasionAttack, make_attack, register
from fedmed.evasion.bim import bim
from fedmed.evasion.fgsm import fgsm
from fedmed.evasion.mifgsm import mifgsm
from fedmed.evasion.pgd import pgd
from fedmed.models import build_model
from fedmed.synthetic import make_synthetic
from fedmed.train import evaluate, gather_batch
from strategies.global_assessment import check_eval_config

CPU = torch.device("cpu")
EPS = 8 / 255
L2_EPS = 0.5  # an L2 radius of the size used for 28 px images in the literature


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    """Two-class synthetic 28 px grey images: 64 to train on, 32 held out."""
    return make_synthetic(num_classes=2, channels=1, size=28, n_train=64, n_val=0, n_test=32, seed=0)


@pytest.fixture(scope="module")
def trained(data):
    """ResNet18 fitted for 30 Adam steps on the 64 training images (about 4 s on one core),
    so that it classifies them correctly and attacks have something to break. Returned in
    eval mode with no parameter gradients; tests that change it work on a copy."""
    previous = torch.get_num_threads()  # module fixtures are set up before _one_thread
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2, in_channels=1, norm="batch")
    x = gather_batch(data.train.images, np.arange(64), CPU)
    y = torch.from_numpy(data.train.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = torch.randperm(64, generator=generator)[:32]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    torch.set_num_threads(previous)
    return model.eval()


@pytest.fixture(scope="module")
def batch(data):
    """16 training images (the model fits them) and their labels."""
    x = gather_batch(data.train.images, np.arange(16), CPU)
    return x, torch.from_numpy(data.train.labels[:16])


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A small random CNN for tests about attack mechanics rather than accuracy."""
    torch.manual_seed(seed)
    # No global pooling: a random CNN that averages its features is nearly constant in its
    # input, this one is sensitive enough for attacks to change its predictions.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 14 * 14, num_classes),
    ).eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def attack_eps(name: str) -> float:
    return L2_EPS if name == "pgd_l2" else EPS


# --- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_stays_in_its_ball_and_in_pixel_range(trained, batch, name):
    x, y = batch
    eps = attack_eps(name)
    x_adv = make_attack(name, eps, seed=0)(trained, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = x_adv - x
    if name == "pgd_l2":
        norms = delta.flatten(1).norm(dim=1)
        assert float(norms.max()) <= eps * (1 + 1e-5)
        # 10 normalised steps of 2.5 * eps / 10 from inside the ball reach its surface
        # unless clamping to [0, 1] cuts them short: the attack does use its budget.
        assert float(norms.max()) > 0.9 * eps
    else:
        assert float(delta.abs().max()) <= eps + 1e-6
        assert float(delta.abs().max()) >= eps - 1e-6  # some pixel moves the whole budget
    if name == "fgsm":
        # One signed step: every pixel the clamp leaves alone moved by exactly eps.
        free = ((x + EPS) <= 1) & ((x - EPS) >= 0)
        moved = delta[free].abs()
        assert torch.allclose(moved[moved > 0], torch.full_like(moved[moved > 0], EPS), atol=1e-6)
        assert float((moved > 0).float().mean()) > 0.9  # zero gradients are rare


def test_zero_eps_returns_the_input(trained, batch):
    x, y = batch
    for name in ATTACK_NAMES:
        assert torch.equal(make_attack(name, 0.0)(trained, x, y), x), name
    assert torch.equal(fgsm(trained, x, y, eps=0), x)
    assert torch.equal(bim(trained, x, y, eps=0), x)
    assert torch.equal(mifgsm(trained, x, y, eps=0), x)
    for norm in ("linf", "l2"):
        assert torch.equal(pgd(trained, x, y, eps=0, norm=norm), x)


# --- strength ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_attack_does_not_raise_accuracy_and_raises_loss(trained, batch, name):
    x, y = batch
    clean_acc = accuracy(trained, x, y)
    assert clean_acc > 0.9  # the model fits these images, so there is accuracy to lose
    x_adv = make_attack(name, EPS, seed=0)(trained, x, y)
    assert accuracy(trained, x_adv, y) <= clean_acc
    assert mean_loss(trained, x_adv, y) > mean_loss(trained, x, y)


def test_pgd_is_stronger_than_fgsm(trained, batch):
    # Not a theorem, but PGD-10 at 8/255 on this model drives the loss far above one FGSM step.
    x, y = batch
    loss_fgsm = mean_loss(trained, make_attack("fgsm", EPS)(trained, x, y), y)
    loss_pgd = mean_loss(trained, make_attack("pgd", EPS)(trained, x, y), y)
    assert loss_pgd > loss_fgsm


# --- agreement with torchattacks -----------------------------------------------------------
#
# Measured on this model (CPU, 16 images, 5 seeds): our FGSM, PGD (L-inf), BIM, MI-FGSM and
# PGD-L2 outputs are bit-identical to torchattacks' (max |difference| = 0), since both
# evaluate the same operations in the same order. So these tests ask for equality; a
# platform with non-deterministic kernels could flip the sign of near-zero gradients.


def test_fgsm_matches_torchattacks(trained, batch):
    x, y = batch
    ours = fgsm(trained, x, y, eps=EPS)
    theirs = torchattacks.FGSM(trained, eps=EPS)(x, y)
    assert torch.equal(ours, theirs)


def test_targeted_fgsm_matches_torchattacks(trained, batch):
    x, y = batch
    target = 1 - y
    ours = fgsm(trained, x, target, eps=EPS, targeted=True)
    reference = torchattacks.FGSM(trained, eps=EPS)
    reference.set_mode_targeted_by_function(lambda images, labels: 1 - labels)
    assert torch.equal(ours, reference(x, y))


@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_matches_torchattacks_from_the_same_start(trained, batch, seed):
    x, y = batch
    alpha, steps = 2 / 255, 10
    torch.manual_seed(seed)
    delta = torch.empty_like(x).uniform_(-EPS, EPS)  # torchattacks' random start, same draw
    ours = pgd(trained, x, y, eps=EPS, alpha=alpha, steps=steps, init_delta=delta)
    torch.manual_seed(seed)
    theirs = torchattacks.PGD(trained, eps=EPS, alpha=alpha, steps=steps, random_start=True)(x, y)
    assert float((ours - theirs).abs().max()) == 0.0
    assert not torch.equal(ours, x)


def test_seeded_random_start_matches_torchattacks(trained, batch):
    # A fresh CPU generator seeded with s draws what torch's global generator draws after
    # torch.manual_seed(s), and our random starts draw in torchattacks' order: so our own random
    # start (not only init_delta) can be checked against theirs. A quarter of each image is
    # black and a quarter white, so that clamping the start to [0, 1] matters.
    x, y = batch
    x = x.clone()
    x[..., :7, :] = 0.0
    x[..., -7:, :] = 1.0
    ours = pgd(trained, x, y, eps=EPS, alpha=2 / 255, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    theirs = torchattacks.PGD(trained, eps=EPS, alpha=2 / 255, steps=10, random_start=True)(x, y)
    assert torch.equal(ours, theirs)
    ours = pgd(trained, x, y, eps=L2_EPS, alpha=0.1, norm="l2", generator=torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    theirs = torchattacks.PGDL2(
        trained,
        eps=L2_EPS,
        alpha=0.1,
        steps=10,
        random_start=True,
        eps_for_division=torch.finfo(torch.float32).tiny,
    )(x, y)
    # The L2 start is scaled in another order of operations (measured: 6e-8, one float32 ulp).
    assert float((ours - theirs).abs().max()) <= 1e-6


def test_pgd_l2_matches_torchattacks_from_the_same_start(trained, batch):
    # torchattacks.PGDL2 divides the gradient by (||grad|| + 1e-10). With a mean-reduced loss a
    # confidently classified image has ||grad|| down to 1e-17 here, so its default 1e-10 all but
    # stops those images (ours normalises exactly). With a negligible eps_for_division both agree.
    x, y = batch
    alpha, steps = 0.1, 10
    torch.manual_seed(3)
    delta = torch.empty_like(x).normal_()
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta *= torch.zeros_like(norms).uniform_(0, 1) / norms * L2_EPS  # torchattacks' draw
    ours = pgd(trained, x, y, eps=L2_EPS, alpha=alpha, steps=steps, norm="l2", init_delta=delta)
    torch.manual_seed(3)
    theirs = torchattacks.PGDL2(
        trained,
        eps=L2_EPS,
        alpha=alpha,
        steps=steps,
        random_start=True,
        eps_for_division=torch.finfo(torch.float32).tiny,
    )(x, y)
    assert float((ours - theirs).abs().max()) == 0.0


def test_mifgsm_and_bim_match_torchattacks(trained, batch):
    # torchattacks.MIFGSM normalises the gradient by its mean absolute value per sample, the
    # paper by its L1 norm: they differ by the constant C*H*W for gradient and momentum alike,
    # so the signs, and the steps, are the same. Our defaults differ (alpha = eps/steps as in
    # the papers, torchattacks 2/255), so alpha is given explicitly.
    x, y = batch
    alpha, steps = 2 / 255, 10
    ours = mifgsm(trained, x, y, eps=EPS, alpha=alpha, steps=steps, decay=1.0)
    theirs = torchattacks.MIFGSM(trained, eps=EPS, alpha=alpha, steps=steps, decay=1.0)(x, y)
    assert torch.equal(ours, theirs)
    ours = bim(trained, x, y, eps=EPS, alpha=alpha, steps=steps)
    theirs = torchattacks.BIM(trained, eps=EPS, alpha=alpha, steps=steps)(x, y)
    assert torch.equal(ours, theirs)


# --- targeted ------------------------------------------------------------------------------


def _targeted(name: str, model, x, target, eps, generator=None):
    if name == "fgsm":
        return fgsm(model, x, target, eps=eps, targeted=True)
    if name == "bim":
        return bim(model, x, target, eps=eps, targeted=True)
    if name == "mifgsm":
        return mifgsm(model, x, target, eps=eps, targeted=True)
    norm = "l2" if name == "pgd_l2" else "linf"
    return pgd(model, x, target, eps=eps, norm=norm, generator=generator, targeted=True)


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_targeted_attack_moves_towards_the_target(name):
    # Three classes, so that "towards the target" is not the same as "away from the label".
    model = tiny_cnn(num_classes=3)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean_probs = torch.softmax(model(x), 1)
    target = (clean_probs.argmax(1) + 1) % 3  # a class the model does not predict now
    eps = 2.0 if name == "pgd_l2" else 16 / 255
    x_adv = _targeted(name, model, x, target, eps, torch.Generator().manual_seed(0))
    with torch.no_grad():
        adv_probs = torch.softmax(model(x_adv), 1)
    rows = torch.arange(16)
    assert float(adv_probs[rows, target].mean()) > float(clean_probs[rows, target].mean())
    hit_before = float((clean_probs.argmax(1) == target).float().mean())
    hit_after = float((adv_probs.argmax(1) == target).float().mean())
    assert hit_before == 0.0 and hit_after > 0.5  # most images now predicted as their target
    # The untargeted attack with the same labels must not be what the targeted one does.
    assert not torch.equal(x_adv, make_attack(name, eps)(model, x, target))


# --- side effects --------------------------------------------------------------------------


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_model_mode_restored_and_no_parameter_gradients(trained, batch):
    model = copy.deepcopy(trained)
    model.train()
    model.backbone.layer1.eval()  # a mixed state (e.g. frozen BatchNorms) must survive exactly
    before = _modes(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    sentinel = torch.full_like(model.head.weight, 0.5)  # a .grad left by someone else
    model.head.weight.grad = sentinel.clone()
    x, y = batch
    for name in ATTACK_NAMES:
        make_attack(name, attack_eps(name))(model, x, y)
        assert _modes(model) == before, name
    # Eval mode during the attack: BatchNorm statistics were not updated.
    for key, value in model.state_dict().items():
        if key in buffers:
            assert torch.equal(value, buffers[key]), key
    assert torch.equal(model.head.weight.grad, sentinel)
    assert all(p.grad is None for n, p in model.named_parameters() if p is not model.head.weight)


def test_model_mode_restored_after_an_error(trained, batch):
    model = copy.deepcopy(trained).train()
    x, y = batch
    with pytest.raises((IndexError, RuntimeError)):
        pgd(model, x, torch.full_like(y, 7), eps=EPS)  # label 7 of 2 classes
    assert all(_modes(model))


def test_attacks_work_under_no_grad(batch):
    model = tiny_cnn()
    x, y = batch
    expected = pgd(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = pgd(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected) and not torch.equal(got, x)


# --- seeding and names ---------------------------------------------------------------------


def test_same_seed_same_pgd_and_different_seed_different(batch):
    model = tiny_cnn()
    x, y = batch
    for name in ("pgd", "pgd_l2"):
        eps = attack_eps(name)
        first = make_attack(name, eps, seed=1)(model, x, y)
        assert torch.equal(first, make_attack(name, eps, seed=1)(model, x, y))
        assert not torch.equal(first, make_attack(name, eps, seed=2)(model, x, y))
    a = pgd(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, pgd(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(5)))


def test_pgd_k_runs_k_steps(batch):
    model = tiny_cnn()
    x, y = batch
    got = make_attack("pgd20", EPS, seed=3)(model, x, y)
    expected = pgd(model, x, y, eps=EPS, steps=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)
    ten = pgd(model, x, y, eps=EPS, steps=10, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(got, ten)
    assert torch.equal(make_attack("pgd", EPS, seed=3)(model, x, y), ten)


def test_default_step_sizes(batch):
    # PGD: 2.5 * eps / steps (Madry et al.'s rule of thumb); BIM and MI-FGSM: eps / steps.
    model = tiny_cnn()
    x, y = batch
    for norm, eps in (("linf", EPS), ("l2", L2_EPS)):
        default = pgd(model, x, y, eps=eps, steps=4, norm=norm, generator=torch.Generator().manual_seed(0))
        explicit = pgd(
            model, x, y, eps=eps, steps=4, norm=norm, alpha=2.5 * eps / 4, generator=torch.Generator().manual_seed(0)
        )
        assert torch.equal(default, explicit), norm
    assert torch.equal(bim(model, x, y, eps=EPS, steps=4), bim(model, x, y, eps=EPS, steps=4, alpha=EPS / 4))
    assert torch.equal(mifgsm(model, x, y, eps=EPS, steps=4), mifgsm(model, x, y, eps=EPS, steps=4, alpha=EPS / 4))
    assert not torch.equal(bim(model, x, y, eps=EPS, steps=4), bim(model, x, y, eps=EPS, steps=4, alpha=EPS / 2))


@pytest.mark.parametrize("name", ["pgdx", "PGD", "cw", "pgd0", "pgd_linf", ""])
def test_make_attack_rejects_unknown_names(name):
    with pytest.raises(ValueError) as info:
        make_attack(name, EPS)
    message = str(info.value)
    assert repr(name) in message
    for known in ATTACK_NAMES:
        assert known in message
    assert "pgd<k>" in message


def test_invalid_arguments_are_rejected(batch):
    model = tiny_cnn()
    x, y = batch
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        make_attack("pgd", -1.0)
    with pytest.raises(ValueError, match="norm"):
        pgd(model, x, y, eps=EPS, norm="l1")
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps"):
            pgd(model, x, y, eps=EPS, steps=steps)
        with pytest.raises(ValueError, match="steps"):
            bim(model, x, y, eps=EPS, steps=steps)
        with pytest.raises(ValueError, match="steps"):
            mifgsm(model, x, y, eps=EPS, steps=steps)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(model, x * 2 - 1, y, eps=EPS)  # normalised input instead of pixels
    with pytest.raises(ValueError, match="init_delta"):
        pgd(model, x, y, eps=EPS, init_delta=torch.zeros(1, 1, 28, 28))


def test_attack_names_constant():
    assert ATTACK_NAMES == ("fgsm", "bim", "mifgsm", "pgd", "pgd_l2")
    assert attacks.ATTACK_NAMES is ATTACK_NAMES


# --- robustness assessment ------------------------------------------------------------------


def test_eps_key_and_fixed_subset():
    assert eps_key(8 / 255) == "0.0314"
    assert eps_key(0.0) == "0.0000"
    assert np.array_equal(fixed_subset(10, None, seed=0), np.arange(10))
    assert np.array_equal(fixed_subset(10, 10, seed=0), np.arange(10))
    assert np.array_equal(fixed_subset(10, 50, seed=0), np.arange(10))
    subset = fixed_subset(100, 7, seed=4)
    assert len(subset) == 7 and len(np.unique(subset)) == 7
    assert np.array_equal(subset, np.sort(subset)) and subset.min() >= 0 and subset.max() < 100
    assert np.array_equal(subset, fixed_subset(100, 7, seed=4))
    assert not np.array_equal(subset, fixed_subset(100, 7, seed=5))


def test_assess_robustness_keys_values_determinism_and_clean_bound(trained, data):
    images, labels = data.test.images, data.test.labels
    indices = fixed_subset(len(labels), 20, seed=0)
    eps = [0.0, 2 / 255, 8 / 255]
    kwargs = dict(attacks=["fgsm", "pgd"], eps=eps, batch_size=8, device=CPU, seed=0)
    result = assess_robustness(trained, images, labels, indices, **kwargs)
    scores = ("accuracy", "balanced_accuracy", "auc")
    assert set(result) == {
        f"adv/{a}/{k}/{m}"
        for a in ("fgsm", "pgd")
        for k in ("0.0000", "0.0078", "0.0314")
        for m in (*scores, "success_rate")
    } | {f"adv/none/0.0000/{m}" for m in scores}
    for key, value in result.items():
        assert value is None or 0.0 <= value <= 1.0, key
    assert all(isinstance(result[k], float) for k in result if k.endswith("accuracy"))
    assert assess_robustness(trained, images, labels, indices, **kwargs) == result

    clean = evaluate(trained, images, labels, indices, batch_size=8, device=CPU)
    assert clean["accuracy"] > 0.5  # better than chance on held-out images
    assert result["adv/none/0.0000/accuracy"] == clean["accuracy"]  # the same images, unattacked
    for attack in ("fgsm", "pgd"):
        # eps = 0 is the clean model: same accuracy and AUC as fedmed.train.evaluate.
        assert result[f"adv/{attack}/0.0000/accuracy"] == clean["accuracy"]
        assert result[f"adv/{attack}/0.0000/auc"] == pytest.approx(clean["auc"])
        assert result[f"adv/{attack}/0.0000/balanced_accuracy"] == clean["balanced_accuracy"]
        assert result[f"adv/{attack}/0.0000/success_rate"] == 0.0
        for key in ("0.0078", "0.0314"):
            accuracy, success = result[f"adv/{attack}/{key}/accuracy"], result[f"adv/{attack}/{key}/success_rate"]
            assert accuracy <= clean["accuracy"], (attack, key)
            # the images right when clean that the attack left right are right under attack;
            # only the ones wrong when clean can add to that
            kept = clean["accuracy"] * (1 - success)
            assert kept - 1e-9 <= accuracy <= kept + (1 - clean["accuracy"]) + 1e-9, (attack, key)
    assert result["adv/pgd/0.0314/success_rate"] > 0  # PGD at 8/255 turns some right answers wrong
    assert result["adv/pgd/0.0314/accuracy"] < clean["accuracy"]  # PGD at 8/255 does break it


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd3", "bim", "mifgsm", "pgd_l2"])
def test_attack_each_eps_equals_each_radius_attacked_alone(trained, batch, name):
    x, y = batch
    eps, seeds = [0.0, 1 / 255, 4 / 255, 8 / 255], [5, 6, 7, 8]
    together = attacks.attack_each_eps(name, eps, seeds, trained, x, y)
    alone = [make_attack(name, e, seed=s)(trained, x, y) for e, s in zip(eps, seeds)]
    assert len(together) == len(eps)
    for e, a, b in zip(eps, together, alone):
        assert torch.equal(a, b), (name, e)
    assert not torch.equal(together[1], together[3])  # each copy kept its own radius


def test_assess_robustness_batched_epsilons_equal_one_radius_at_a_time(trained, data, monkeypatch):
    images, labels = data.test.images, data.test.labels
    kwargs = dict(attacks=["fgsm", "pgd"], eps=[1 / 255, 4 / 255, 8 / 255], batch_size=8, device=CPU, seed=3)
    calls = []
    batched = attacks.attack_each_eps
    monkeypatch.setattr(
        "fedmed.adversarial_eval.attack_each_eps",
        lambda name, eps, *args: calls.append(len(eps)) or batched(name, eps, *args),
    )
    together = assess_robustness(trained, images, labels, np.arange(20), **kwargs)
    assert set(calls) == {3}  # every epsilon of an attack in one batch
    calls.clear()
    monkeypatch.setattr("fedmed.adversarial_eval.ATTACK_BATCH_VALUES", 0)
    alone = assess_robustness(trained, images, labels, np.arange(20), **kwargs)
    assert set(calls) == {1}
    assert together == alone


def test_assess_robustness_attacks_the_transformed_batch(trained, data):
    images, labels = data.test.images, data.test.labels
    indices = np.arange(16)

    def invert(x):
        return 1.0 - x

    result = assess_robustness(
        trained,
        images,
        labels,
        indices,
        attacks=["fgsm"],
        eps=[0.0, EPS],
        batch_size=16,
        device=CPU,
        seed=0,
        transform=invert,
    )
    clean = evaluate(trained, images, labels, indices, batch_size=16, device=CPU, transform=invert)
    assert result["adv/fgsm/0.0000/accuracy"] == clean["accuracy"]
    x = invert(gather_batch(images, indices, CPU))
    y = torch.from_numpy(labels[indices])
    expected = accuracy(trained, fgsm(trained, x, y, eps=EPS), y)
    assert result[f"adv/fgsm/{eps_key(EPS)}/accuracy"] == pytest.approx(expected)


def test_assess_robustness_restores_the_model_mode(trained, data):
    model = copy.deepcopy(trained).train()
    images, labels = data.test.images, data.test.labels
    result = assess_robustness(
        model, images, labels, np.arange(8), attacks=["fgsm"], eps=[0.0], batch_size=8, device=CPU, seed=0
    )
    assert all(_modes(model))
    # ... and it classified in eval mode (train-mode BatchNorm would use batch statistics).
    clean = evaluate(model, images, labels, np.arange(8), batch_size=8, device=CPU)
    assert result["adv/fgsm/0.0000/accuracy"] == clean["accuracy"]


def test_assess_robustness_rejects_unknown_attacks_and_repeated_names(trained, data):
    images, labels = data.test.images, data.test.labels
    with pytest.raises(ValueError, match="known attacks"):
        assess_robustness(
            trained, images, labels, np.arange(4), attacks=["deepfool"], eps=[EPS], batch_size=4, device=CPU, seed=0
        )
    with pytest.raises(ValueError, match="repeat"):
        assess_robustness(
            trained,
            images,
            labels,
            np.arange(4),
            attacks=["fgsm"],
            eps=[EPS, 0.03137],
            batch_size=4,
            device=CPU,
            seed=0,
        )


# --- the registry -------------------------------------------------------------------------------


def _noise(model, x, y, *, eps, generator):
    """A test attack that ignores the model: ``x + eps * sign(uniform noise)`` from ``generator``."""
    noise = torch.empty_like(x).uniform_(-1, 1, generator=generator)
    return torch.clamp(x.detach() + eps * noise.sign(), 0.0, 1.0)


def _noise_each_eps(model, copies):
    noise = torch.cat([torch.empty_like(copies.x).uniform_(-1, 1, generator=g) for g in copies.generators()])
    return torch.clamp(copies.xs + copies.eps * noise.sign(), 0.0, 1.0)


@pytest.fixture
def noise_attack():
    """An attack registered from a test, with a random start and every radius in one batch."""
    record = register(EvasionAttack("noise", _noise, random_start=True, each_eps=_noise_each_eps))
    yield record
    del ATTACKS["noise"]


def test_a_registered_attack_is_taken_by_the_config_check_make_attack_and_every_radius(
    noise_attack, trained, data, batch, monkeypatch
):
    x, y = batch
    check_eval_config(["fgsm", "noise", "pgd20"], [EPS], None)
    attack = make_attack("noise", EPS, seed=4)
    x_adv = attack(trained, x, y)
    assert not torch.equal(x_adv, x) and float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert torch.equal(make_attack("noise", EPS, seed=4)(trained, x, y), x_adv)  # seeded
    assert not torch.equal(make_attack("noise", EPS, seed=5)(trained, x, y), x_adv)
    assert torch.equal(pickle.loads(pickle.dumps(attack))(trained, x, y), x_adv)  # as Ray workers get it

    eps, seeds = [0.0, 2 / 255, EPS], [1, 2, 3]
    alone = [make_attack("noise", e, seed=s)(trained, x, y) for e, s in zip(eps, seeds)]
    calls = []
    monkeypatch.setitem(
        ATTACKS, "noise", replace(noise_attack, each_eps=lambda *args: calls.append(1) or _noise_each_eps(*args))
    )
    together = attacks.attack_each_eps("noise", eps, seeds, trained, x, y)
    assert calls == [1]  # every radius in one batch
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    monkeypatch.setitem(ATTACKS, "noise", replace(noise_attack, each_eps=None))  # one radius after the other
    assert all(torch.equal(a, b) for a, b in zip(attacks.attack_each_eps("noise", eps, seeds, trained, x, y), alone))

    result = assess_robustness(
        trained,
        data.test.images,
        data.test.labels,
        np.arange(8),
        attacks=["noise"],
        eps=[EPS],
        batch_size=8,
        device=CPU,
        seed=0,
    )
    assert f"adv/noise/{eps_key(EPS)}/accuracy" in result


def test_registry_refuses_unknown_names_listing_the_known_ones_and_a_second_registration(noise_attack):
    with pytest.raises(ValueError) as info:
        check_eval_config(["fgsm", "deepfool"], [EPS], None)
    message = str(info.value)
    assert "'deepfool'" in message and "pgd<k>" in message
    for known in (*ATTACK_NAMES, "noise"):
        assert known in message
    with pytest.raises(ValueError, match="registered already"):
        register(EvasionAttack("fgsm", _noise))


def test_registered_attacks_and_the_pgd_k_family():
    assert tuple(ATTACKS) == ATTACK_NAMES  # no test's registration left behind
    assert attacks.attack_named("pgd") is ATTACKS["pgd"]
    pgd7 = attacks.attack_named("pgd7")
    assert pgd7.name == "pgd7" and pgd7.random_start and pgd7.each_eps is not None
    assert ATTACKS["pgd_l2"].each_eps is None  # one radius after the other
    assert not ATTACKS["fgsm"].random_start
