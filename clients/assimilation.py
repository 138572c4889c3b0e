"""Local training of the domain-assimilation modules (fedmed/assimilation.py): the GLCM
texture-preservation loss added to a round's training step, and the backbone frozen for the first
``assimilation.freeze_backbone_rounds`` rounds. Training only: evaluation and attacks use the
model's plain output."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmed.assimilation import glcm_offsets, texture_loss
from fedmed.config import AssimilationConfig
from fedmed.train import TrainStep, cross_entropy_step


def _classifier(model: nn.Module) -> nn.Module:
    # Opacus wraps the model in a GradSampleModule (its hooks sit on the inner modules)
    return getattr(model, "_module", model)


def has_modules(model: nn.Module) -> bool:
    return bool(getattr(_classifier(model), "has_modules", False))


class TextureStep:
    """Cross entropy + ``weight`` x texture loss in one forward and one backward pass (the
    adapted image feeds both), so that DP-SGD clips one loss per example."""

    def __init__(self, weight: float, levels: int, distances: list[int]) -> None:
        self.weight, self.levels, self.offsets = float(weight), int(levels), glcm_offsets(list(distances))

    def texture(self, x: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        return self.weight * texture_loss(x, adapted, self.levels, self.offsets)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        classifier = _classifier(model)
        adapted = classifier.adapt(x)
        logits = classifier.classify_adapted(adapted)
        loss = F.cross_entropy(logits, y) + self.texture(x, adapted)
        loss.backward()
        return loss.detach(), logits.detach()


class WithTextureLoss(TextureStep):
    """A defence's step (adversarial training, distillation), then the texture loss of the clean
    batch through the modules alone, its gradients added to the step's."""

    def __init__(self, step: TrainStep, weight: float, levels: int, distances: list[int]) -> None:
        super().__init__(weight, levels, distances)
        self.step = step

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.step(model, x, y)
        extra = self.texture(x, _classifier(model).adapt(x))
        extra.backward()
        return loss + extra.detach(), logits


def with_texture_loss(step: TrainStep | None, model: nn.Module, settings: AssimilationConfig) -> TrainStep | None:
    """``step`` (None: plain cross entropy) with the texture loss added when the model has
    modules and ``assimilation.texture_weight`` > 0; ``step`` unchanged otherwise."""
    weight = float(settings.texture_weight)
    if weight == 0 or not has_modules(model):
        return step
    levels, distances = settings.levels, list(settings.distances)
    if step is None or step is cross_entropy_step:
        return TextureStep(weight, levels, distances)
    return WithTextureLoss(step, weight, levels, distances)


@contextlib.contextmanager
def backbone_frozen(model: nn.Module, frozen: bool) -> Iterator[None]:
    """While ``frozen``: the backbone's parameters, its head excepted, take no gradient (the
    assimilation modules and the head learn); each parameter's own setting comes back on exit,
    since a client reuses its model object from round to round."""
    if not frozen:
        yield
        return
    classifier = _classifier(model)
    head = {id(p) for p in classifier.head.parameters()}
    changed = [p for p in classifier.backbone.parameters() if p.requires_grad and id(p) not in head]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)
