"""Why FedMedian learns more slowly than FedAvg on the quick backdoor study's setting.

Ten honest clients (PneumoniaMNIST 28 px, ResNet18 from scratch, IID shares of the training split,
one local epoch of SGD 0.01, batch 32, as the study's `quick` configuration) train from the same
global model; the script compares the coordinate-wise median of their updates with their mean
(learned weights only, as the robust rules see them): norms, cosine, the honest clients' pairwise
cosines, and the test loss of the global model after each aggregate (BatchNorm statistics averaged
in both). The federation then moves on with the mean, for ``--rounds`` rounds.

    python -m experiments.median_vs_mean [--rounds 3] [--root ../shared/data/medmnist]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from fedmed.data import dataset_from_config  # noqa: E402
from fedmed.models import build_model  # noqa: E402
from fedmed.serialization import load_arrays, model_to_arrays  # noqa: E402
from fedmed.train import evaluate, make_optimizer, train_local  # noqa: E402
from strategies.robust_aggregation import apply_update, batchnorm_statistics, stack_updates  # noqa: E402

CLIENTS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared/data/medmnist"))
    args = parser.parse_args()
    cpu = torch.device("cpu")
    data = dataset_from_config({"name": "pneumoniamnist", "root": args.root, "size": 28, "verify_md5": True}, 0)
    torch.manual_seed(0)
    model = build_model("resnet18", data.num_classes, data.channels)
    global_arrays = model_to_arrays(model)
    share = len(data.train.labels) // CLIENTS
    order = np.random.default_rng(0).permutation(len(data.train.labels))

    def test_loss(arrays) -> float:
        local = copy.deepcopy(model)
        load_arrays(local, arrays)
        return evaluate(local, data.test.images, data.test.labels, batch_size=256, device=cpu)["loss"]

    print(f"{CLIENTS} clients x {share} images, ResNet18, one epoch of SGD 0.01 a round")
    print(
        "round  |mean|  |median|  cos(median, mean)  client cos (min..max)   test loss: mean  median  mean at |median|"
    )
    for rnd in range(args.rounds):
        records = []
        for client in range(CLIENTS):
            local = copy.deepcopy(model)
            load_arrays(local, global_arrays)
            optimizer = make_optimizer(local.parameters(), "sgd", 0.01, 0.0, 5e-4)
            train_local(
                local,
                data.train.images,
                data.train.labels,
                order[client * share : (client + 1) * share],
                epochs=1,
                batch_size=32,
                optimizer=optimizer,
                device=cpu,
                seed=100 * rnd + client,
                augment=True,
            )
            records.append(model_to_arrays(local))
        updates = stack_updates(records, global_arrays)
        statistics = batchnorm_statistics(records, torch.full((CLIENTS,), float(share)), [])
        mean, median = updates.mean(0), updates.median(0).values
        unit = updates / updates.norm(dim=1, keepdim=True)
        pairwise = (unit @ unit.T)[~torch.eye(CLIENTS, dtype=torch.bool)]
        cosine = float(mean @ median / (mean.norm() * median.norm()))
        losses = [
            test_loss(apply_update(global_arrays, u, None, statistics))
            for u in (mean, median, mean * median.norm() / mean.norm())
        ]
        print(
            f"{rnd + 1:>5}  {float(mean.norm()):6.3f}  {float(median.norm()):8.3f}  {cosine:17.3f}  "
            f"{float(pairwise.min()):+.3f}..{float(pairwise.max()):+.3f}        "
            f"{losses[0]:15.3f}  {losses[1]:6.3f}  {losses[2]:16.3f}",
            flush=True,
        )
        global_arrays = apply_update(global_arrays, mean, None, statistics)


if __name__ == "__main__":
    main()
