"""Tests for fedmed.models: shapes at MedMNIST sizes, pixel-space wrapper, weight loading."""

from __future__ import annotations

import copy
import os
import re
import socket
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from fedmed.architectures import architecture
from fedmed.models import ARCHITECTURES, MedicalClassifier, build_model, min_input_size

NUM_CLASSES = 3

WEIGHTS = {
    "densenet121": torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
    "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    """Models for the read-only tests of this module, one backbone per architecture: the grey
    and RGB models differ only in the wrapper, so they share it (building is the slow part)."""
    cache: dict[tuple[str, int], MedicalClassifier] = {}

    def get(arch: str, in_channels: int) -> MedicalClassifier:
        if (arch, 1) not in cache:
            torch.manual_seed(0)
            grey = build_model(arch, NUM_CLASSES, 1).eval()
            rgb = MedicalClassifier(grey.backbone, arch, NUM_CLASSES, 3, min_input_size(arch))
            cache[arch, 1], cache[arch, 3] = grey, rgb.eval()
        return cache[arch, in_channels]

    return get


def _cache_file(torch_home, arch: str) -> str:
    url = WEIGHTS[arch].url
    return os.path.join(str(torch_home), "hub", "checkpoints", os.path.basename(url))


# --- forward at MedMNIST sizes -------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_shapes(built, arch, in_channels):
    model = built(arch, in_channels)
    assert (model.arch, model.num_classes, model.in_channels) == (arch, NUM_CLASSES, in_channels)
    for size in (28, 64):
        x = torch.rand(2, in_channels, size, size)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (2, NUM_CLASSES)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resize_only_below_minimum(built, arch):
    model = built(arch, 1)
    seen = []
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    hook = first_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        with torch.no_grad():
            model(torch.rand(2, 1, 28, 28))
            model(torch.rand(2, 1, 64, 64))
    finally:
        hook.remove()
    expected_28 = max(28, min_input_size(arch))
    assert seen[0] == (2, 3, expected_28, expected_28)
    assert seen[1] == (2, 3, 64, 64)


def test_min_input_sizes():
    assert min_input_size("densenet121") == 29
    for arch in ("resnet18", "resnet50", "mobilenet_v2"):
        assert min_input_size(arch) <= 28  # MedMNIST 28 px goes in unresized
    with pytest.raises(ValueError, match="densenet121"):
        min_input_size("vgg16")


def test_normalisation_in_pixel_space(built):
    model = built("resnet18", 3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - mean) / std))

    grey_model = built("resnet18", 1)
    g = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey_model(g), grey_model.backbone((g.expand(-1, 3, -1, -1) - mean) / std))


def test_input_gradient_flows_through_wrapper(built):
    # Attacks differentiate the loss with respect to the [0, 1] pixels.
    model = built("densenet121", 1)  # grey + resize: both steps must pass gradients
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0


def test_wrong_channel_count_is_rejected(built):
    with pytest.raises(ValueError, match=r"in_channels=1"):
        built("resnet18", 1)(torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_normalisation_buffers_not_in_state_dict(built, arch):
    model = built(arch, 3)
    keys = model.state_dict().keys()
    assert "mean" not in keys and "std" not in keys
    assert all(k.startswith("backbone.") for k in keys)
    assert {n for n, _ in model.named_buffers()} >= {"mean", "std"}


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_group_norm_and_frozen_backbone(arch):
    model = build_model(arch, NUM_CLASSES, 1, freeze_backbone=True, norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.head.parameters()}
    assert model.head.out_features == NUM_CLASSES
    # GroupNorm needs no batch statistics: train mode with one 28 px image works.
    model.train()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 28, 28)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_group_norm_model_survives_backward_hooks(arch):
    # Opacus puts a full backward hook on every layer with parameters; autograd then forbids
    # in-place changes of those layers' outputs (torchvision's ReLU(inplace=True), `out +=
    # identity`, DenseNet's F.relu(..., inplace=True)), and says so during the forward pass.
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, 1, norm="group").eval()
    x = torch.rand(2, 1, 28, 28)

    # The out-of-place forward computes what torchvision's own forward computes.
    original = copy.deepcopy(model)
    for module in original.modules():
        if type(module).__name__.startswith("_OutOfPlace"):
            module.__class__ = type(module).__bases__[0]
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    assert model(x).shape == (2, NUM_CLASSES)  # raised "... is being modified inplace" before


# Torch notes that the stem's hook sees no input gradient (pixels need none here); expected.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_group_norm_model_per_sample_gradients_with_opacus():
    from opacus import GradSampleModule

    model = GradSampleModule(build_model("resnet18", NUM_CLASSES, 1, norm="group"))
    x = torch.rand(2, 1, 28, 28)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    for p in model.parameters():
        assert p.grad_sample.shape == (2, *p.shape)


def test_frozen_backbone_with_batch_norm():
    model = build_model("resnet18", NUM_CLASSES, 3, freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.fc.weight", "backbone.fc.bias"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="densenet121, mobilenet_v2, resnet50, resnet18"):
        build_model("vgg16", NUM_CLASSES, 3)
    with pytest.raises(ValueError, match="layer"):
        build_model("resnet18", NUM_CLASSES, 3, norm="layer")
    with pytest.raises(ValueError, match="in_channels"):
        build_model("resnet18", NUM_CLASSES, 4)


# --- pretrained weights --------------------------------------------------------------------


def _densenet_old_keys(state_dict):
    # The layout of the published DenseNet checkpoints: 'denselayer1.norm.1.weight', and no
    # 'num_batches_tracked' (they predate it; BatchNorm fills it in when loading).
    old = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)
        old[key] = value
    return old


def _reference(arch: str, seed: int = 123):
    torch.manual_seed(seed)
    reference = getattr(torchvision.models, arch)()
    state_dict = reference.state_dict()
    if arch == "densenet121":
        state_dict = _densenet_old_keys(state_dict)
        assert any(".norm.1." in k for k in state_dict)
    return reference, state_dict


def _assert_backbone_loaded(model: MedicalClassifier, reference: nn.Module):
    ref = reference.state_dict()
    got = model.backbone.state_dict()
    head = architecture(model.arch).head
    compared = 0
    for key, value in ref.items():
        if key.startswith(head + "."):
            continue
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
        compared += 1
    assert compared > 10
    assert model.head.out_features == NUM_CLASSES


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_pretrained_from_torch_hub_cache(tmp_path, monkeypatch, arch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference, state_dict = _reference(arch)
    path = _cache_file(tmp_path, arch)
    os.makedirs(os.path.dirname(path))
    torch.save(state_dict, path)

    def no_download(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    model = build_model(arch, NUM_CLASSES, 1, pretrained=True)
    _assert_backbone_loaded(model, reference)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_weights_path(tmp_path, arch):
    reference, state_dict = _reference(arch, seed=7)
    path = tmp_path / "weights.pth"
    torch.save(state_dict, path)
    model = build_model(arch, NUM_CLASSES, 3, weights_path=str(path))
    _assert_backbone_loaded(model, reference)


def test_weights_path_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_model("resnet18", NUM_CLASSES, 3, weights_path=str(missing))

    wrong = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), wrong)
    with pytest.raises(ValueError, match=re.escape(str(wrong))):
        build_model("resnet18", NUM_CLASSES, 3, weights_path=str(wrong))


def test_pretrained_without_cache_or_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    timeouts = []

    def offline(url, dst, *args, **kwargs):
        # Stands in for the network being unreachable (and never downloads for real in CI).
        timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    previous = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError) as info:
        build_model("resnet18", NUM_CLASSES, 1, pretrained=True)
    message = str(info.value)
    assert _cache_file(tmp_path, "resnet18") in message
    assert WEIGHTS["resnet18"].url in message
    assert "weights_path" in message
    # The download was tried under a finite socket timeout, restored afterwards.
    assert timeouts and timeouts[0] is not None and timeouts[0] > 0
    assert socket.getdefaulttimeout() == previous


def test_a_new_architecture_is_one_record(monkeypatch, tmp_path):
    # torchvision's ResNet34 is not in fedmed's registry; one record makes it buildable, with the
    # head replaced, the backbone frozen and torchvision-layout weights loaded like the others'
    from fedmed.architectures import ARCHITECTURES as registry
    from fedmed.architectures import Architecture

    monkeypatch.setitem(registry, "resnet34", Architecture("resnet34", "ResNet34_Weights.IMAGENET1K_V1", "fc"))
    reference = torchvision.models.resnet34()
    torch.save(reference.state_dict(), tmp_path / "resnet34.pth")
    model = build_model("resnet34", NUM_CLASSES, 1, weights_path=str(tmp_path / "resnet34.pth"), freeze_backbone=True)
    _assert_backbone_loaded(model, reference)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "backbone.fc.weight",
        "backbone.fc.bias",
    ]
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, NUM_CLASSES)


def test_every_architecture_is_a_model_option():
    from tests.helpers import compose_config

    for name in ARCHITECTURES:
        assert compose_config(f"model={name}").model.name == name
    with pytest.raises(Exception, match="resnet18"):  # Hydra lists the options
        compose_config("model=vgg16")
