"""What the clients' optimizer step costs, fused (``fedmed.train.make_optimizer``) against torch's
default on the CPU (a Python loop over the parameter tensors), beside a whole training step.

One thread, as a Ray actor with one CPU runs; each model at 28 px with a batch of 32 (the
simulation's defaults), the backbones fedmed offers. For every model and optimizer: the median
over ``--repeats`` timings of ``--steps`` optimizer steps each way, and of ``--steps`` whole
training steps (forward, backward, step) with each.

    python -m experiments.bench_optimizer [--models resnet18 ...] [--optimizers adam sgd]
        [--steps 20] [--repeats 3] [--threads 1]

Last line: adam_step_speedup=<unfused / fused Adam step, ResNet18>.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
import torch.nn.functional as F

from fedmed.models import build_model
from fedmed.train import make_optimizer


def seconds_per_call(call, steps: int, repeats: int) -> float:
    call()  # allocates the optimizer's state
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            call()
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def unfused(optimizer: torch.optim.Optimizer, params=None) -> torch.optim.Optimizer:
    """The same optimizer with torch's CPU default, the per-tensor loop, over ``params`` (default:
    the same parameters)."""
    params = optimizer.param_groups[0]["params"] if params is None else params
    accepted = inspect.signature(type(optimizer)).parameters
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("fused", "foreach")}
    return type(optimizer)(params, **settings, foreach=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "densenet121", "resnet50"])
    parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd"], choices=["adam", "adamw", "sgd"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 2, (32,))
    print(f"{args.threads} thread(s), batch 32 at 28 px, median of {args.repeats} x {args.steps} steps")
    print(
        f"{'model':<13} {'optimizer':<9} {'step, torch default':>19} {'step, fused':>12} {'speedup':>8} "
        f"{'train step, default':>20} {'fused':>9}"
    )
    speedup = {}
    for name in args.models:
        model = build_model(name, 2, 1)
        for opt_name in args.optimizers:
            fused = make_optimizer(model.parameters(), opt_name, 1e-3, 0.9, 5e-4)
            loop = unfused(fused)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            fused_s = seconds_per_call(fused.step, args.steps, args.repeats)
            loop_s = seconds_per_call(loop.step, args.steps, args.repeats)

            def train_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module = model) -> None:
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()

            train_fused_s, train_loop_s = (
                seconds_per_call(lambda o=o: train_step(o), max(1, args.steps // 4), args.repeats)
                for o in (fused, loop)
            )
            speedup[name, opt_name] = loop_s / fused_s
            print(
                f"{name:<13} {opt_name:<9} {loop_s * 1e3:16.1f} ms {fused_s * 1e3:9.1f} ms "
                f"{loop_s / fused_s:7.1f}x {train_loop_s * 1e3:9.0f} ms {train_fused_s * 1e3:9.0f} ms"
            )
    if ("resnet18", "adam") in speedup:
        print(f"adam_step_speedup={speedup['resnet18', 'adam']:.2f}")


if __name__ == "__main__":
    main()
