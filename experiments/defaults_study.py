"""Which local optimiser and normalisation make FedAvg's test accuracy rise steadily?

ResNet18 from scratch on PneumoniaMNIST 28 px, 10 clients, Dirichlet(1.0), one local epoch per
round, batch 32, weight decay 5e-4, seed 0, FedAvg as a bare loop (experiments/bare_loop.py:
fedmed's own data, model and training code, no Flower). Prints the global test accuracy and AUC
of rounds 0..R for each setting; the README's "Defaults, and why" table came from these.

    python -m experiments.defaults_study [--rounds 6] [--only 4 5]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HERE = Path(__file__).resolve().parent

from experiments.bare_loop import bare_fedavg  # noqa: E402

# (optimiser, lr, momentum, norm, augment)
SETTINGS = [
    ("sgd", 0.01, 0.9, "batch", False),
    ("sgd", 0.01, 0.9, "group", False),
    ("sgd", 0.01, 0.0, "group", False),
    ("adam", 0.001, 0.0, "group", False),
    ("sgd", 0.01, 0.0, "batch", False),
    ("sgd", 0.01, 0.0, "batch", True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--only", type=int, nargs="*", help="indices into SETTINGS")
    args = parser.parse_args()
    logging.getLogger("opacus").setLevel(logging.WARNING)
    chosen = args.only if args.only else range(len(SETTINGS))
    for i in chosen:
        optimizer, lr, momentum, norm, augment = SETTINGS[i]
        rows = bare_fedavg(
            dataset="pneumoniamnist",
            root=args.root,
            model_name="resnet18",
            norm=norm,
            num_clients=10,
            rounds=args.rounds,
            partition={"name": "dirichlet", "alpha": 1.0, "min_partition_size": 10},
            epochs=1,
            batch_size=32,
            optimizer=optimizer,
            lr=lr,
            momentum=momentum,
            weight_decay=5e-4,
            augment=augment,
            val_fraction=0.1,
            seed=0,
        )
        label = f"{optimizer} lr={lr} momentum={momentum} norm={norm} augment={augment}"
        print(
            f"{label:55s} accuracy "
            + " ".join(f"{r['accuracy']:.3f}" for r in rows)
            + " | auc "
            + " ".join(f"{(r['auc'] or 0):.3f}" for r in rows),
            flush=True,
        )


if __name__ == "__main__":
    main()
