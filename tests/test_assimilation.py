"""Domain assimilation: the differentiable GLCM against scikit-image, the texture and colour
modules (identity at the start, in the gradient path, in the state dict), their training (texture
loss, frozen backbone, defences) and the configuration's refusals."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict
from omegaconf import OmegaConf
from skimage.feature import graycomatrix, graycoprops

from clients.assimilation import TextureStep, backbone_frozen
from clients.local_training import LocalData, train_round
from fedmed.assimilation import FEATURES, glcm_features, glcm_offsets, soft_glcm, texture_loss
from fedmed.config import AssimilationConfig, ClientConfig, check_assimilation
from fedmed.defenses import defense_config, defense_section
from fedmed.evasion import make_attack
from fedmed.job import Job
from fedmed.models import ARCHITECTURES, build_model
from fedmed.synthetic import make_synthetic
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def quantised(batch: int, height: int, width: int, levels: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Random images already on the ``levels`` levels: as uint8 level indices, and in [0, 1]."""
    img = np.random.default_rng(seed).integers(0, levels, (batch, height, width)).astype(np.uint8)
    return img, torch.from_numpy(img).double().unsqueeze(1) / (levels - 1)


def skimage_glcm(image: np.ndarray, offset: tuple[int, int], levels: int) -> np.ndarray:
    """graycomatrix at the distance and angle that its code turns into exactly this step."""
    dr, dc = offset
    return graycomatrix(image, [math.hypot(dr, dc)], [math.atan2(dr, dc)], levels=levels, symmetric=True, normed=True)


# --- GLCM --------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [4, 8])
def test_soft_glcm_and_features_equal_scikit_image_on_quantised_images(levels):
    images, x = quantised(3, 19, 23, levels, seed=levels)
    offsets = glcm_offsets([1, 2, 4]) + [(-3, 2), (0, 5), (2, -1)]
    P = soft_glcm(x, levels, offsets)
    features = glcm_features(P)
    assert P.shape == (3, len(offsets), levels, levels)
    assert set(features) == set(FEATURES) and all(v.shape == (3, len(offsets)) for v in features.values())
    for b in range(3):
        for k, offset in enumerate(offsets):
            expected = skimage_glcm(images[b], offset, levels)
            np.testing.assert_allclose(P[b, k].numpy(), expected[:, :, 0, 0], atol=1e-12)
            for name in FEATURES:
                np.testing.assert_allclose(
                    features[name][b, k].item(),
                    graycoprops(expected, name)[0, 0],
                    atol=1e-12,
                    err_msg=f"{name} at offset {offset}",
                )


def test_offsets_are_graycomatrix_angles_as_its_code_computes_them():
    # 0, 45, 90, 135 degrees at distance 1 give graycomatrix's own matrices (its rows count down)
    images, x = quantised(1, 16, 16, 6, seed=3)
    ours = soft_glcm(x, 6, glcm_offsets([1]))[0]
    theirs = graycomatrix(
        images[0], [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=6, symmetric=True, normed=True
    )
    for k in range(4):
        np.testing.assert_allclose(ours[k].numpy(), theirs[:, :, 0, k], atol=1e-12)
    # diagonal steps keep the distance in rows and columns (chessboard), no rounding of d / sqrt(2)
    assert glcm_offsets([1, 2, 4]) == [
        (0, 1),
        (1, 1),
        (1, 0),
        (1, -1),
        (0, 2),
        (2, 2),
        (2, 0),
        (2, -2),
        (0, 4),
        (4, 4),
        (4, 0),
        (4, -4),
    ]


def test_correlation_of_a_constant_image_is_one_as_in_graycoprops():
    x = torch.full((1, 1, 8, 8), 3 / 7, dtype=torch.float64)
    P = soft_glcm(x, 8, [(0, 1)])
    assert glcm_features(P)["correlation"].item() == 1.0


def test_soft_glcm_gradients_are_finite_and_non_zero():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    features = glcm_features(soft_glcm(x, 8, glcm_offsets([1, 2, 4])))
    for name in FEATURES:
        (grad,) = torch.autograd.grad(features[name].sum(), x, retain_graph=True)
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    # the texture loss between an image and a changed copy also passes gradients to the copy
    changed = (x.detach() * 0.5 + 0.2).requires_grad_(True)
    loss = texture_loss(x.detach(), changed, 8, glcm_offsets([1, 2]))
    (grad,) = torch.autograd.grad(loss, changed)
    assert loss > 0 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_soft_glcm_refuses_what_it_cannot_count():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="grey images"):
        soft_glcm(torch.rand(2, 3, 8, 8), 8, [(0, 1)])
    with pytest.raises(ValueError, match="levels"):
        soft_glcm(x, 1, [(0, 1)])
    with pytest.raises(ValueError, match=r"offset \(0, 8\) pairs no pixels"):
        soft_glcm(x, 8, [(0, 8)])
    with pytest.raises(ValueError, match="distances"):
        glcm_offsets([0, 1])


# --- modules -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_modules_start_as_the_baseline_with_the_same_backbone_weights(arch):
    for in_channels in (1, 3):
        torch.manual_seed(0)
        baseline = build_model(arch, 3, in_channels).eval()
        x = torch.rand(2, in_channels, 28, 28)
        with torch.no_grad():
            expected = baseline(x)
        for kind in ("texture", "colour", "both"):
            model = build_model(arch, 3, in_channels, assimilation=kind)
            missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
            assert unexpected == []
            assert missing and all(k.startswith(("texture.", "colour.")) for k in missing), missing
            assert any(k.startswith("texture.") for k in missing) == (kind != "colour")
            assert any(k.startswith("colour.") for k in missing) == (kind != "texture")
            with torch.no_grad():
                torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)


def test_module_weights_are_in_the_state_dict_and_train_with_a_frozen_backbone():
    model = build_model("resnet18", 2, 1, freeze_backbone=True, assimilation="both")
    names = list(model.state_dict())
    assert any(n.startswith("texture.") for n in names) and any(n.startswith("colour.") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {
        n for n, _ in model.named_parameters() if n.startswith(("texture.", "colour.", "backbone.fc."))
    } == trainable
    # the baseline's state dict has no module entries at all
    assert not any(n.startswith(("texture", "colour")) for n in build_model("resnet18", 2, 1).state_dict())


def _perturb_modules(model: torch.nn.Module) -> None:
    """Move the zero-initialised output convolutions off zero: modules that have learned."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (model.texture.body[-1], model.colour.out):
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_input_gradients_pass_through_the_modules(in_channels):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, in_channels, assimilation="both").eval()
    _perturb_modules(model)
    x = torch.rand(4, in_channels, 28, 28, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the gradient at the input is not the one at the adapted image: the modules are in the path
    adapted = model.adapt(x.detach()).requires_grad_(True)
    (at_adapted,) = torch.autograd.grad(F.cross_entropy(model.classify_adapted(adapted), y), adapted)
    passed_through = at_adapted if in_channels == 3 else at_adapted.sum(1, keepdim=True)
    assert not torch.allclose(x.grad, passed_through, atol=1e-6)
    for name, p in model.named_parameters():
        if name.startswith(("texture.", "colour.")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # a white-box attack through the modules changes the loss (no masked gradient)
    x_adv = make_attack("pgd", 8 / 255, seed=0)(model, x.detach(), y)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x.detach()), y)


# --- training ----------------------------------------------------------------------------


def _settings(**changes) -> AssimilationConfig:
    return AssimilationConfig(**changes)


def _job(kind: str, defense_changes: dict | None = None, **assimilation) -> Job:
    client = OmegaConf.to_container(OmegaConf.structured(ClientConfig))
    client.update(augment=False, batch_size=16)
    changes = dict(defense_changes or {})
    defense = defense_section(changes.pop("name", "none"), **changes)
    return Job.from_plain(
        {
            "defense": defense,
            "client": client,
            "rounds": 3,
            "model": {"assimilation": kind},
            "assimilation": dict(assimilation),
        }
    )


@pytest.fixture(scope="module")
def small_data():
    data = make_synthetic(num_classes=3, channels=1, size=28, n_train=64, n_val=8, n_test=8, seed=0)
    return LocalData(data.train.images, data.train.labels, np.arange(64))


def _changed(before: dict, model: torch.nn.Module, prefix: str) -> bool:
    return any(
        not torch.equal(before[n], p)
        for n, p in model.state_dict().items()
        if n.startswith(prefix) and p.is_floating_point()
    )


def test_texture_step_adds_the_weighted_texture_loss_to_cross_entropy():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, assimilation="both").train()
    _perturb_modules(model)
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    step = TextureStep(2.0, 8, [1, 2])
    loss, logits = step(model, x, y)
    expected = F.cross_entropy(logits, y) + 2.0 * texture_loss(x, model.adapt(x), 8, glcm_offsets([1, 2]))
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    assert model.texture.body[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "defense_changes",
    [
        {},
        {"name": "fgsm_at"},
        {"name": "fgsm_at", "clean_weight": 0.5},
        {"name": "distillation", "temperature": 4.0},
        {"name": "dp_sgd", "noise_multiplier": 0.5},
    ],
    ids=["none", "fgsm_at", "fgsm_at-half-clean", "distillation", "dp_sgd"],
)
def test_both_modules_train_with_each_defense(defense_changes, small_data):
    torch.manual_seed(0)
    norm = "group" if defense_changes.get("name") == "dp_sgd" else "batch"
    model = build_model("resnet18", 3, 1, norm=norm, assimilation="both")
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    metrics = train_round(
        model,
        small_data,
        _job("both", defense_changes),
        server_round=1,
        seed=0,
        device=torch.device("cpu"),
        state=RecordDict(),
    )
    assert math.isfinite(metrics["train_loss"])
    assert _changed(before, model, "texture.") and _changed(before, model, "colour.")
    assert _changed(before, model, "backbone.")


def test_backbone_is_frozen_for_the_first_rounds_only(small_data):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 1, assimilation="both")
    job = _job("both", freeze_backbone_rounds=1)
    body = [
        n
        for n in model.state_dict()
        if n.startswith("backbone.") and not n.startswith("backbone.fc.") and n.endswith("weight")
    ]
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    train_round(model, small_data, job, server_round=1, seed=0, device=torch.device("cpu"), state=RecordDict())
    after_first = model.state_dict()
    assert all(torch.equal(before[n], after_first[n]) for n in body)
    assert _changed(before, model, "texture.") and _changed(before, model, "colour.")
    assert _changed(before, model, "backbone.fc.")
    assert all(p.requires_grad for p in model.parameters())  # restored for the next round
    first = {n: p.detach().clone() for n, p in model.state_dict().items()}
    train_round(model, small_data, job, server_round=2, seed=1, device=torch.device("cpu"), state=RecordDict())
    assert any(not torch.equal(first[n], model.state_dict()[n]) for n in body)


def test_frozen_backbone_context_restores_what_was_frozen_before():
    model = build_model("resnet18", 2, 1, freeze_backbone=True, assimilation="texture")
    with backbone_frozen(model, True):
        assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")] == [
            "backbone.fc.weight",
            "backbone.fc.bias",
        ]
    assert not model.backbone.conv1.weight.requires_grad  # was frozen by model.freeze_backbone, stays so


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, changes, extra, message",
    [
        ("all", {}, {}, "model.assimilation='all' is not known"),
        ("both", {"texture_weight": -1.0}, {}, r"assimilation.texture_weight=-1.0"),
        ("both", {"levels": 1}, {}, "assimilation.levels=1"),
        ("both", {"distances": []}, {}, r"assimilation.distances=\[\]"),
        ("both", {"distances": [1, 0]}, {}, r"assimilation.distances=\[1, 0\]"),
        ("both", {"distances": [1, 28]}, {"image_size": 28}, r"assimilation.distances=\[1, 28\] reach past"),
        ("both", {"freeze_backbone_rounds": -1}, {}, "assimilation.freeze_backbone_rounds=-1"),
        ("both", {"freeze_backbone_rounds": 2}, {"freeze_backbone": True}, "model.freeze_backbone=true"),
        ("both", {"freeze_backbone_rounds": 3}, {"rounds": 3}, "federation.rounds=3"),
    ],
)
def test_bad_assimilation_settings_are_refused_by_name(kind, changes, extra, message):
    defense = defense_config(defense_section("none"))
    with pytest.raises(ValueError, match=message):
        check_assimilation(_settings(**changes), kind, defense, **extra)


def test_texture_loss_under_dp_sgd_adversarial_training_is_refused(small_data):
    job = _job("both", {"name": "dp_sgd", "noise_multiplier": 1.0, "adversarial": "fgsm_at"})
    model = build_model("resnet18", 3, 1, norm="group", assimilation="both")
    with pytest.raises(ValueError, match="assimilation.texture_weight=1.0 with defense=dp_sgd"):
        train_round(model, small_data, job, server_round=1, seed=0, device=torch.device("cpu"), state=RecordDict())
    job.assimilation.texture_weight = 0.0  # without the texture loss it trains
    train_round(model, small_data, job, server_round=1, seed=0, device=torch.device("cpu"), state=RecordDict())


def test_configuration_keys():
    cfg = compose_config("model.assimilation=both", "assimilation.levels=16", "assimilation.distances=[1,3]")
    assert cfg.model.assimilation == "both" and cfg.assimilation.levels == 16
    assert list(cfg.assimilation.distances) == [1, 3] and cfg.assimilation.freeze_backbone_rounds == 0
    assert compose_config().model.assimilation == "none"
    with pytest.raises(Exception, match="texture_wieght"):
        compose_config("assimilation.texture_wieght=1")
    with pytest.raises(ValueError, match="model.assimilation='colour_only'"):
        build_model("resnet18", 2, 1, assimilation="colour_only")


# --- in a federation ---------------------------------------------------------------------


@pytest.mark.slow
def test_federation_aggregates_the_module_weights_and_assesses_robustness(tmp_path, on_cluster):
    import json

    from safetensors.torch import load_file

    from fedmed.runner import run

    cfg = compose_config(
        *on_cluster,
        "model.assimilation=both",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        "federation.rounds=2",
        "dataset.n_train=160",
        "dataset.n_test=64",
        "eval.max_samples=32",
        "eval.every=2",
        "eval.attacks=[fgsm,pgd]",
        "eval.eps=[0.0314]",
        "eval.clients=false",
        "progress=false",
        f"output_dir={tmp_path}",
    )
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for attack in ("fgsm", "pgd"):
        assert 0 <= rows[2][f"adv/{attack}/0.0314/accuracy"] <= 1
    weights = load_file(str(tmp_path / "model.safetensors"))
    # the output convolutions start at zero: non-zero in the global model means the clients'
    # trained modules came back and were averaged into it
    for name in ("texture.body.3.weight", "colour.out.weight"):
        assert weights[name].abs().sum() > 0, name
    assert weights["texture.scale.weight"].item() != 0.1 and weights["colour.scale.weight"].item() != 0.1
