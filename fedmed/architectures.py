"""The backbones fedmed builds, one record each: adding an architecture is one ``Architecture``
here (``model=<name>`` is stored in Hydra's ConfigStore from this registry).

Records hold names, not torchvision objects, so that the configuration is composed and checked
without importing torchvision; ``fedmed.models`` resolves them with torchvision's public
``get_model`` and ``get_weight``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """A torchvision backbone behind ``fedmed.models.MedicalClassifier``.

    name : torchvision's model name (``torchvision.models.get_model(name)``), and fedmed's
        ``model=`` option.
    weights : torchvision's name of the ImageNet weights ``model.pretrained=true`` loads
        (``torchvision.models.get_weight``).
    head : path of the classification ``nn.Linear`` in the backbone: replaced by one with the
        dataset's classes, and left trainable with ``model.freeze_backbone=true``.
    min_input_size : smallest square input (pixels) the backbone accepts; smaller images are
        resized up inside the model.
    old_checkpoint_keys : the ImageNet checkpoint uses key names torchvision renames on loading
        (DenseNet's ``norm.1`` -> ``norm1``).
    """

    name: str
    weights: str
    head: str
    min_input_size: int = 1
    old_checkpoint_keys: bool = False


# Minimum sizes found by trying every size from 1 px up (eval and train mode, batch of 2).
# DenseNet121's three transition layers each halve the map with a 2x2 average pool; at 28 px the
# map reaches 0x0 in the last one, 29 px is the first size that survives. ResNets and MobileNetV2
# end in adaptive pooling and their strided convs are padded, so any size works; 28 px MedMNIST
# images go in unresized.
ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", "classifier", 29, old_checkpoint_keys=True),
        Architecture("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", "classifier.1"),
        # IMAGENET1K_V2: the better of torchvision's two ResNet50 weight sets
        Architecture("resnet50", "ResNet50_Weights.IMAGENET1K_V2", "fc"),
        Architecture("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "fc"),
    )
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r} (config key `model`); valid names: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
