"""Local training and evaluation on uint8 image arrays.

Batches are gathered from the (possibly memory-mapped) uint8 arrays by index, moved to the
device, and only there turned into floats, augmented and, for a site, shifted: whole batches at
once, no per-sample transforms (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.metrics import classification_metrics
from fedmed.precision import Precision
from fedmed.seeds import Stream, seed_for

BatchTransform = Callable[[torch.Tensor], torch.Tensor]
# One training step's gradients: takes (model, x, y), leaves the gradients in the parameters'
# .grad (it calls backward itself, so a defence can reuse a pass) and returns (loss, logits).
TrainStep = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain training: cross entropy on the batch."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), logits.detach()


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA device; use device=cpu or auto")
    return torch.device(device)


def gather_batch(images: np.ndarray, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, C) rows -> float (B, C, H, W) in [0, 1] on ``device``."""
    rows = torch.from_numpy(np.ascontiguousarray(images[indices]))
    rows = rows.to(device, non_blocking=True)
    return rows.permute(0, 3, 1, 2).float().div_(255.0)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip and a small random affine (rotate, scale, shift) per image, in one grid_sample."""
    n = x.shape[0]
    rand = torch.rand(n, 5, generator=generator, device=x.device)
    angle = (rand[:, 0] - 0.5) * (2 * math.radians(10.0))
    scale = 1.0 + (rand[:, 1] - 0.5) * 0.2
    shift = (rand[:, 2:4] - 0.5) * 0.2
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# Devices with torch's fused optimizer kernels (one pass over all parameters per step). Without
# them torch loops over the parameter tensors in Python on the CPU: for ResNet18's Adam step that
# loop cost as much as a third of a training step (experiments/bench_optimizer.py).
FUSED_DEVICES = ("cpu", "cuda")


def fusable(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def make_optimizer(
    params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]
    fused = fusable(trainable) or None  # None: torch's own default elsewhere
    if name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"client.optimizer={name!r} is not known; use sgd, adam or adamw")


def batch_order(indices: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Shuffled batches of ``indices``; a last batch of one image is dropped because BatchNorm
    cannot normalise a single sample in training mode (it rotates out with the shuffle)."""
    return cut_batches(indices[torch.randperm(len(indices), generator=generator).numpy()], batch_size)


def cut_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` in batches of ``batch_size``, without a last batch of one image."""
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def balanced_batch_order(
    indices: np.ndarray, labels: np.ndarray, batch_size: int, generator: torch.Generator
) -> list[np.ndarray]:
    """One epoch of ``len(indices)`` draws with replacement in which every class present among
    ``labels[indices]`` is equally likely (each image weighted by 1 / its class's count), in
    batches as ``batch_order`` cuts them."""
    own = np.asarray(labels)[indices]
    _, inverse, counts = np.unique(own, return_inverse=True, return_counts=True)
    weights = torch.from_numpy(1.0 / counts[inverse])
    drawn = torch.multinomial(weights, len(indices), replacement=True, generator=generator).numpy()
    return cut_batches(indices[drawn], batch_size)


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    seed: int,
    augment: bool = False,
    transform: BatchTransform | None = None,
    step: TrainStep = cross_entropy_step,
    batches: Callable[[], Iterable[np.ndarray]] | None = None,
    precision: Precision | None = None,
    balanced: bool = False,
) -> dict[str, float]:
    """Train ``model`` in place for ``epochs`` over ``images[indices]``; returns mean loss and accuracy.

    ``step`` computes each batch's gradients (a defence's loss); ``batches``, if given, yields one
    epoch's index batches instead of the shuffled ones (DP-SGD's Poisson sampling); ``balanced``:
    class-balanced batches instead (``client.balanced_sampling``, ``balanced_batch_order``);
    ``precision``: ``client.amp`` and ``client.channels_last`` (default float32, contiguous).
    """
    if len(indices) < 2:
        raise ValueError(f"a client needs at least 2 training images, got {len(indices)}")
    if balanced and batches is not None:
        raise ValueError(
            "balanced sampling and a training's own batches (DP-SGD's Poisson sampling) exclude each other"
        )
    batch_seed = seed_for(seed, Stream.BATCH_ORDER)
    generator = torch.Generator().manual_seed(batch_seed)
    device_generator = generator if device.type == "cpu" else torch.Generator(device).manual_seed(batch_seed)
    precision = precision or Precision(device=device)
    precision.prepare_model(model.to(device)).train()
    label_tensor = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    total_loss, total_correct, total_seen, steps = 0.0, 0, 0, 0
    with precision.training(model) as optimizer_step:
        for _ in range(epochs):
            if batches is not None:
                epoch = batches()
            elif balanced:
                epoch = balanced_batch_order(np.asarray(indices), labels, batch_size, generator)
            else:
                epoch = batch_order(np.asarray(indices), batch_size, generator)
            for batch in epoch:
                x = gather_batch(images, batch, device)
                y = label_tensor[batch].to(device, non_blocking=True)
                if transform is not None:
                    x = transform(x)
                if augment:
                    x = augment_batch(x, device_generator)
                optimizer.zero_grad(set_to_none=True)
                with precision.autocast():
                    loss, logits = step(model, precision.prepare_input(x), y)
                optimizer_step(optimizer)
                total_loss += float(loss) * len(batch)
                total_correct += int((logits.argmax(1) == y).sum())
                total_seen += len(batch)
                steps += 1
    if total_seen == 0:
        return {"loss": math.nan, "accuracy": math.nan, "steps": steps}
    return {"loss": total_loss / total_seen, "accuracy": total_correct / total_seen, "steps": steps}


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    transform: BatchTransform | None = None,
    precision: Precision | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, num_classes) for ``images[indices]`` in eval mode."""
    precision = precision or Precision(device=device)
    precision.prepare_model(model.to(device)).eval()
    outputs = []
    for start in range(0, len(indices), batch_size):
        x = gather_batch(images, indices[start : start + batch_size], device)
        if transform is not None:
            x = transform(x)
        with precision.autocast():
            logits = model(precision.prepare_input(x))
        outputs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(outputs).numpy()


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    device: torch.device,
    transform: BatchTransform | None = None,
    precision: Precision | None = None,
) -> dict[str, float | None]:
    """Loss, accuracy, balanced accuracy and macro AUC of ``model`` on ``images[indices]``."""
    if indices is None:
        indices = np.arange(len(labels))
    probs = predict_probs(
        model, images, indices, batch_size=batch_size, device=device, transform=transform, precision=precision
    )
    return classification_metrics(np.asarray(labels)[indices], probs)
