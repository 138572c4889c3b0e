"""What the domain-assimilation modules and the GLCM texture loss cost per local epoch.

For each setting, the baseline model (no modules, cross entropy) and the same backbone with
`model.assimilation=both` trained with cross entropy + texture loss (levels 8, distances 1, 2, 4:
12 offsets) run one epoch over the same batches; epochs alternate so that a noisy machine slows
both alike, and the median of `--repeats` is taken.

Settings: ResNet18 on PneumoniaMNIST 28 px (the quick study's), and MobileNetV2 at 64 px (the
28 px images resized up once, before training). Target (issue 14): ResNet18 28 px ratio <= 1.5.

    python -m experiments.bench_assimilation [--images 512] [--repeats 3] [--threads 1]

Last line: assimilation_cost_ratio=<ResNet18 28 px: modules + texture loss / baseline epoch>.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clients.assimilation import TextureStep
from fedmed.data import load_dataset
from fedmed.models import build_model
from fedmed.train import make_optimizer, train_local

HERE = Path(__file__).resolve().parent
SETTINGS = [("resnet18", 28), ("mobilenet_v2", 64)]


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) images at ``size`` px (bilinear), as the dataset loader would give them."""
    if images.shape[1] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def epoch_timer(arch: str, assimilation: str, images, labels, indices, batch_size: int, num_classes: int):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, images.shape[-1], assimilation=assimilation)
    step = TextureStep(1.0, 8, [1, 2, 4]) if assimilation != "none" else None

    def run() -> float:
        optimizer = make_optimizer(model.parameters(), "sgd", 0.01, 0.0, 5e-4)
        started = time.perf_counter()
        train_local(
            model,
            images,
            labels,
            indices,
            epochs=1,
            batch_size=batch_size,
            optimizer=optimizer,
            device=torch.device("cpu"),
            seed=0,
            **({"step": step} if step else {}),
        )
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    # one thread: two OpenMP threads on a shared 2-core machine stall each other (bench_defenses.py)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("pneumoniamnist", seed=0, root=args.root)
    indices = np.sort(np.random.default_rng(0).choice(len(data.train.labels), args.images, replace=False))
    # only the sampled images, renumbered, so that resizing to 64 px stays small
    images, labels, order = data.train.images[indices], data.train.labels[indices], np.arange(args.images)
    print(
        f"PneumoniaMNIST, {args.images} images, batch {args.batch_size}, texture loss 8 levels x 12 offsets, "
        f"median of {args.repeats} epochs, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )
    print(f"{'setting':22s} {'baseline s':>10s} {'both+GLCM s':>11s} {'ratio':>6s}")
    ratios = {}
    for arch, size in SETTINGS:
        at_size = resized(images, size)
        timers = {
            kind: epoch_timer(arch, kind, at_size, labels, order, args.batch_size, data.num_classes)
            for kind in ("none", "both")
        }
        for timer in timers.values():  # warm-up: first-call allocations and kernel selection
            timer()
        times: dict[str, list[float]] = {kind: [] for kind in timers}
        for _ in range(args.repeats):
            for kind, timer in timers.items():
                times[kind].append(timer())
        base, both = statistics.median(times["none"]), statistics.median(times["both"])
        ratios[arch, size] = both / base
        print(f"{arch + f' {size} px':22s} {base:10.2f} {both:11.2f} {both / base:6.2f}", flush=True)
    ratio = ratios["resnet18", 28]
    print(f"target: ResNet18 28 px <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}")
    print(f"assimilation_cost_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
