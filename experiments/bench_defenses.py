"""What each client-side defence costs per local epoch, relative to clean training.

Same model (ResNet18), same data (PneumoniaMNIST 28 px, a fixed sample of training images),
same batches, one process; each defence's epoch is timed `--repeats` times, interleaved with
the others so that a noisy machine slows all of them alike, and the median is taken. DP-SGD
needs GroupNorm, so it is compared with clean training of the GroupNorm model.

Targets (issue 3): FGSM-AT and fast AT at most 2.1x clean, PGD-k at most k + 1.2x clean.

    python -m experiments.bench_defenses [--images 1024] [--repeats 3] [--pgd-steps 7]

Last line: fgsm_at_cost_ratio=<FGSM-AT epoch time / clean epoch time>.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict

from fedmed.data import load_dataset
from fedmed.defenses.privacy import PrivateRound
from fedmed.defenses.steps import AdversarialTraining, SoftLabelStep, temperature_step
from fedmed.models import build_model
from fedmed.train import make_optimizer, train_local

HERE = Path(__file__).resolve().parent
EPS = 8 / 255


def epoch_timer(name: str, data, indices: np.ndarray, batch_size: int, pgd_steps: int):
    """A function that trains one epoch with defence ``name`` and returns its seconds."""
    norm = "group" if name.endswith("(GN)") else "batch"
    torch.manual_seed(0)
    model = build_model("resnet18", data.num_classes, data.channels, norm=norm)
    images, labels = data.train.images, data.train.labels
    cpu = torch.device("cpu")

    def run() -> float:
        optimizer = make_optimizer(model.parameters(), "sgd", 0.01, 0.0, 5e-4)
        generator = torch.Generator().manual_seed(0)
        step = {
            "fgsm_at": lambda: AdversarialTraining("fgsm", EPS, clean_weight=0.5),
            "fast_at": lambda: AdversarialTraining("fast", EPS, generator=generator),
            f"pgd_at (k={pgd_steps})": lambda: AdversarialTraining("pgd", EPS, steps=pgd_steps, generator=generator),
            "distillation, federated": lambda: SoftLabelStep(copy.deepcopy(model), 4.0, soft_weight=0.5),
        }.get(name)
        started = time.perf_counter()
        if name == "distillation, defensive":
            # the teacher's epoch at T, then the model's epoch on its soft labels
            teacher = copy.deepcopy(model)
            train_local(
                teacher,
                images,
                labels,
                indices,
                epochs=1,
                batch_size=batch_size,
                optimizer=make_optimizer(teacher.parameters(), "sgd", 0.01, 0.0, 5e-4),
                device=cpu,
                seed=0,
                step=temperature_step(20.0),
            )
            train_local(
                model,
                images,
                labels,
                indices,
                epochs=1,
                batch_size=batch_size,
                optimizer=optimizer,
                device=cpu,
                seed=0,
                step=SoftLabelStep(teacher, 20.0),
            )
        elif name == "dp_sgd (GN)":
            with PrivateRound(
                model,
                optimizer,
                indices,
                batch_size=batch_size,
                noise_multiplier=1.0,
                target_epsilon=None,
                delta=1e-5,
                max_grad_norm=1.0,
                total_epochs=1,
                state=RecordDict(),
                seed=0,
            ) as private:
                train_local(
                    private.model,
                    images,
                    labels,
                    indices,
                    epochs=1,
                    batch_size=batch_size,
                    optimizer=private.optimizer,
                    device=cpu,
                    seed=0,
                    batches=private.batches,
                )
        else:
            train_local(
                model,
                images,
                labels,
                indices,
                epochs=1,
                batch_size=batch_size,
                optimizer=optimizer,
                device=cpu,
                seed=0,
                **({"step": step()} if step else {}),
            )
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pgd-steps", type=int, default=7)
    # One thread: on a shared 2-core machine two OpenMP threads stall each other at every
    # barrier and the ratios measure that instead of the defences (seen: clean 10x slower).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("pneumoniamnist", seed=0, root=args.root)
    indices = np.sort(np.random.default_rng(0).choice(len(data.train.labels), args.images, replace=False))
    names = [
        "clean",
        "fgsm_at",
        "fast_at",
        f"pgd_at (k={args.pgd_steps})",
        "distillation, defensive",
        "distillation, federated",
        "clean (GN)",
        "dp_sgd (GN)",
    ]
    timers = {name: epoch_timer(name, data, indices, args.batch_size, args.pgd_steps) for name in names}
    for timer in timers.values():  # warm-up: first-call allocations and kernel selection
        timer()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"ResNet18, PneumoniaMNIST 28 px, {args.images} images, batch {args.batch_size}, eps 8/255, "
        f"median of {args.repeats} epochs, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    )
    print(f"{'defence':28s} {'s/epoch':>8s} {'x clean':>8s}  target")
    targets = {"fgsm_at": 2.1, "fast_at": 2.1, f"pgd_at (k={args.pgd_steps})": args.pgd_steps + 1.2}
    for name in names:
        base = median["clean (GN)"] if name.endswith("(GN)") else median["clean"]
        ratio = median[name] / base
        target = targets.get(name)
        verdict = "" if target is None else f"<= {target:.1f} {'met' if ratio <= target else 'NOT met'}"
        print(f"{name:28s} {median[name]:8.2f} {ratio:8.2f}  {verdict}")
    print(f"fgsm_at_cost_ratio={median['fgsm_at'] / median['clean']:.3f}")


if __name__ == "__main__":
    main()
