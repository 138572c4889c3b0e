"""Classifiers for medical images: torchvision backbones behind one pixel-space wrapper.

Every model takes float pixels in [0, 1], shaped (N, C, H, W) with C = 1 (grey) or 3 (RGB).
Grey expansion, resizing of too small images and ImageNet normalisation all happen inside
:class:`MedicalClassifier`, so attacks, epsilons and DP noise work in pixel space
(docs/architecture.md): epsilon 8/255 means the same for every dataset and every architecture.

:func:`build_model` builds any architecture of the registry (``fedmed/architectures.py``,
``model=densenet121`` and so on) through torchvision's public ``get_model`` and ``get_weight``.
"""

from __future__ import annotations

import os
import socket
import urllib.error
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from fedmed.torchvision_import import import_torchvision

torchvision = import_torchvision()
from torchvision.models import WeightsEnum  # noqa: E402 (after import_torchvision, whose comment says why)
from torchvision.models import densenet as _tv_densenet  # noqa: E402
from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402

from fedmed.architectures import ARCHITECTURES as _REGISTRY  # noqa: E402
from fedmed.architectures import Architecture, architecture  # noqa: E402
from fedmed.assimilation import ColourModule, TextureModule, build_modules, check_kind  # noqa: E402

__all__ = ["ARCHITECTURES", "MedicalClassifier", "build_model", "min_input_size"]

ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)

NORMS: tuple[str, ...] = ("batch", "group")

# ImageNet statistics, the ones every torchvision ImageNet weight set was trained with.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# A download that cannot reach the host should fail within this many seconds, not hang:
# the socket timeout bounds each connect and read (DNS failures are immediate anyway).
_DOWNLOAD_TIMEOUT_S = 20.0


def min_input_size(name: str) -> int:
    """Smallest height/width (pixels) the architecture accepts; smaller inputs are resized up."""
    return architecture(name).min_input_size


class MedicalClassifier(nn.Module):
    """A torchvision backbone that takes pixels in [0, 1].

    ``forward(x)``: ``x`` float (N, C, H, W), C = ``in_channels``. The domain-assimilation
    modules, when there are any (``model.assimilation``, :mod:`fedmed.assimilation`), adapt the
    image first (:meth:`adapt`); then grey images are expanded to the backbone's 3-channel stem,
    images smaller than ``min_size`` are resized up (bilinear), and ImageNet normalisation is
    applied (:meth:`classify_adapted`). Mean and std are non-persistent buffers: they move with
    ``.to(device)`` but are not in the state_dict, so they are never averaged, attacked or sent.
    The modules' weights are, under ``texture.*`` and ``colour.*``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        num_classes: int,
        in_channels: int,
        min_size: int,
        texture: TextureModule | None = None,
        colour: ColourModule | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.min_size = min_size
        # None leaves the state dict exactly as without assimilation
        self.texture = texture
        self.colour = colour
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def head(self) -> nn.Module:
        """The classification layer (the only trainable part of the backbone with ``freeze_backbone=True``)."""
        return self.backbone.get_submodule(architecture(self.arch).head)

    @property
    def has_modules(self) -> bool:
        return self.texture is not None or self.colour is not None

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The image after the texture and colour modules (``x`` itself without them)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} built for in_channels={self.in_channels} expects input "
                f"(N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.texture is not None:
            x = self.texture(x)
        if self.colour is not None:
            x = self.colour(x)
        return x

    def classify_adapted(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an image that :meth:`adapt` returned."""
        if x.shape[1] == 1:
            # A view, not a copy: the stem's 3 input channels all see the same grey pixels.
            x = x.expand(-1, 3, -1, -1)
        height, width = x.shape[-2:]
        if height < self.min_size or width < self.min_size:
            size = (max(height, self.min_size), max(width, self.min_size))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_adapted(self.adapt(x))


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    pretrained: bool = False,
    weights_path: str | None = None,
    freeze_backbone: bool = False,
    norm: str = "batch",
    assimilation: str = "none",
) -> MedicalClassifier:
    """Build the architecture called ``name`` (one of :data:`ARCHITECTURES`).

    ``pretrained=True`` loads torchvision's ImageNet weights (from the torch hub cache,
    ``$TORCH_HOME/hub/checkpoints``, or by download); ``weights_path`` loads a state dict in
    torchvision's layout (ImageNet 1000-class head included) from a file instead.
    ``freeze_backbone=True`` leaves only the new head trainable. ``norm="group"`` swaps every
    BatchNorm for GroupNorm through Opacus, as DP-SGD needs (per-sample gradients).
    ``assimilation`` (``none``, ``texture``, ``colour``, ``both``) puts the domain-assimilation
    modules in front of the backbone (:mod:`fedmed.assimilation`); they start as the identity
    (grey replicated for the colour module) and stay trainable with ``freeze_backbone=True``.
    """
    return _build(
        architecture(name), num_classes, in_channels, pretrained, weights_path, freeze_backbone, norm, assimilation
    )


# --- internals -----------------------------------------------------------------------------


def _build(
    spec: Architecture,
    num_classes: int,
    in_channels: int,
    pretrained: bool,
    weights_path: str | None,
    freeze_backbone: bool,
    norm: str,
    assimilation: str,
) -> MedicalClassifier:
    arch = spec.name
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{arch}: num_classes must be a positive integer, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(
            f"{arch}: in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}; check the dataset's channel count"
        )
    if norm not in NORMS:
        raise ValueError(f"{arch}: unknown norm {norm!r} (config key `model.norm`); valid: {', '.join(NORMS)}")

    check_kind(assimilation)  # before the slow part

    # Built with torchvision's own 1000-class head so that ImageNet checkpoints load strictly
    # (every key checked); the head is replaced only afterwards.
    backbone = torchvision.models.get_model(arch)
    if weights_path is not None:
        _load_into(backbone, spec, _read_weights_file(weights_path, arch), str(weights_path))
    elif pretrained:
        state_dict, source = _read_imagenet_weights(torchvision.models.get_weight(spec.weights), arch)
        _load_into(backbone, spec, state_dict, source)

    _replace_head(backbone, spec.head, num_classes)

    if norm == "group":
        # Opacus replaces each BatchNorm by GroupNorm(min(32, C), C), the same fix the DP-SGD
        # client applies. It must run before freezing: it only visits modules with trainable
        # parameters. Pretrained BatchNorm statistics and affine parameters are dropped.
        from opacus.validators import ModuleValidator

        backbone = ModuleValidator.fix(backbone)
        _remove_inplace_ops(backbone)

    if freeze_backbone:
        backbone.requires_grad_(False)
        backbone.get_submodule(spec.head).requires_grad_(True)

    # after the backbone, so that a seed gives the same backbone with and without modules
    texture, colour = build_modules(assimilation, in_channels)
    return MedicalClassifier(backbone, arch, num_classes, in_channels, spec.min_input_size, texture, colour)


def _replace_head(backbone: nn.Module, head: str, num_classes: int) -> None:
    """A new ``nn.Linear`` with ``num_classes`` outputs where the ImageNet head was."""
    parent, _, leaf = head.rpartition(".")
    old = backbone.get_submodule(head)
    setattr(backbone.get_submodule(parent), leaf, nn.Linear(old.in_features, num_classes))


# --- norm="group": no in-place ops, for Opacus -----------------------------------------------
#
# Opacus computes per-sample gradients with full backward hooks on every layer with parameters
# (conv, GroupNorm, linear). Autograd forbids modifying such a layer's output in place, and
# torchvision's models do exactly that: ReLU(inplace=True) after each norm, `out += identity` at
# the end of each ResNet block, F.relu(features, inplace=True) in DenseNet.forward. Left as they
# are, the first DP-SGD step fails with "Output 0 of BackwardHookFunction is a view and is being
# modified inplace". The classes below are torchvision's own with those lines made out of place;
# modules, parameters and state_dict keys stay the same.


class _OutOfPlaceBasicBlock(BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _OutOfPlaceBottleneck(Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class _OutOfPlaceDenseNet(_tv_densenet.DenseNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


_OUT_OF_PLACE = {
    BasicBlock: _OutOfPlaceBasicBlock,
    Bottleneck: _OutOfPlaceBottleneck,
    _tv_densenet.DenseNet: _OutOfPlaceDenseNet,
}


def _remove_inplace_ops(backbone: nn.Module) -> None:
    for module in backbone.modules():
        if isinstance(module, (nn.ReLU, nn.ReLU6)):
            module.inplace = False
        elif type(module) in _OUT_OF_PLACE:
            # Same object and submodules, only forward changes (a module-level class, so copies
            # and pickles of the model keep working).
            module.__class__ = _OUT_OF_PLACE[type(module)]


# --- weights -------------------------------------------------------------------------------


def _cache_path(weights: WeightsEnum) -> str:
    # The same path torch.hub.load_state_dict_from_url uses; get_dir() reads TORCH_HOME now.
    file_name = os.path.basename(urlparse(weights.url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def _read_imagenet_weights(weights: WeightsEnum, arch: str) -> tuple[dict[str, Any], str]:
    cache_path = _cache_path(weights)
    if os.path.exists(cache_path):
        return weights.get_state_dict(progress=False, check_hash=True), cache_path

    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
    try:
        state_dict = weights.get_state_dict(progress=False, check_hash=True)
    # URLError (no network, DNS) is an OSError, as are timeouts; both named for the reader.
    except (urllib.error.URLError, OSError) as err:
        raise RuntimeError(
            f"ImageNet weights for {arch} ({weights}) are not available: no file at "
            f"{cache_path} (torch hub cache, $TORCH_HOME/hub/checkpoints) and the download of "
            f"{weights.url} failed ({err}). Either put that file at {cache_path} (download it "
            f"where there is network access), or pass a local copy in torchvision's layout with "
            f"`model.weights_path=/path/to/{os.path.basename(cache_path)}` (build_model("
            f"weights_path=...)); or train from scratch with `model.pretrained=false`."
        ) from err
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return state_dict, weights.url


def _read_weights_file(path: str | os.PathLike, arch: str) -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{arch}: weights file {path!r} (model.weights_path) does not exist; give the path "
            "of a state dict saved from the torchvision model (e.g. the ImageNet .pth file)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        # weights_only: a weights file should hold tensors only, never code to unpickle.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{arch}: could not read weights file {path!r} (model.weights_path) as a torch state dict: {err}"
        ) from err
    if not isinstance(state_dict, dict):
        raise ValueError(
            f"{arch}: weights file {path!r} holds a {type(state_dict).__name__}, not a state "
            "dict; save it with torch.save(model.state_dict(), path)"
        )
    return state_dict


class _HeldWeights:
    """Stands in for a WeightsEnum holding a state dict we have already read, so torchvision's
    own DenseNet loader (which renames the old checkpoint keys, 'norm.1' -> 'norm1' and so on)
    serves both the cache route and the weights_path route."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        self._state_dict = state_dict

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._state_dict


def _load_into(backbone: nn.Module, spec: Architecture, state_dict: dict[str, Any], source: str) -> None:
    arch = spec.name
    try:
        if spec.old_checkpoint_keys:
            _tv_densenet._load_state_dict(backbone, _HeldWeights(state_dict), progress=False)
        else:
            backbone.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(
            f"{arch}: the weights in {source} do not match torchvision's {arch} (with its "
            f"1000-class ImageNet head): {err}. Use a state dict saved from "
            f"torchvision.models.{arch}() or its ImageNet checkpoint."
        ) from err
