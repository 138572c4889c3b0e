"""MedMNIST v2's centralised PneumoniaMNIST baseline, reproduced as federations.

Published (Yang et al., MedMNIST v2, Scientific Data 2023, Table 3): ResNet-18 at 28 px,
test ACC 0.854, AUC 0.944 (100 epochs, Adam, batch 128). Here, with fedmed's defaults:

* centralised: a 1-client federation (one client holds the whole train split);
* 5 clients, IID;
* 5 clients, Dirichlet(0.3) label skew.

Each round is one local epoch, so R rounds see the data R times in every setting.

    python -m experiments.medmnist_baseline [--rounds 20] [--root ../shared/data/medmnist] \
        [--out results/medmnist_baseline]

Writes table.md, table.csv and accuracy.png to --out, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
PUBLISHED = {"accuracy": 0.854, "auc": 0.944}

SETTINGS = {
    "centralised (1 client)": [
        "federation.num_clients=1",
        "federation.clients_per_round=1",
        "partition=iid",
        "ray.num_cpus_per_client=2",
    ],
    "5 clients, IID": ["federation.num_clients=5", "federation.clients_per_round=5", "partition=iid"],
    "5 clients, Dirichlet(0.3)": [
        "federation.num_clients=5",
        "federation.clients_per_round=5",
        "partition=dirichlet",
        "partition.alpha=0.3",
    ],
}


def run_setting(overrides: list[str], common: list[str], out: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "fedmed",
        *common,
        *overrides,
        f"output_dir={out}",
        "progress=false",
        "eval.attacks=[]",
    ]  # clean metrics only, as the published baseline
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--root", default=str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    parser.add_argument("--out", default="results/medmnist_baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [
        "dataset=pneumoniamnist",
        f"dataset.root={args.root}",
        "model=resnet18",
        f"federation.rounds={args.rounds}",
        f"seed={args.seed}",
    ]
    results = {}
    for name, overrides in SETTINGS.items():
        started = time.monotonic()
        slug = name.split(" (")[0].replace(", ", "_").replace(" ", "_").replace("(", "").replace(")", "")
        rows = run_setting(overrides, common, out / slug)
        results[name] = (rows, time.monotonic() - started)
        print(
            f"{name}: final accuracy {rows[-1]['accuracy']:.3f}, AUC {rows[-1]['auc']:.3f} ({results[name][1]:.0f} s)",
            flush=True,
        )

    header = ["setting", "final ACC", "final AUC", "best ACC (round)", "final balanced ACC", "wall s"]
    table = [
        [
            "MedMNIST v2 paper (centralised, 100 epochs)",
            f"{PUBLISHED['accuracy']:.3f}",
            f"{PUBLISHED['auc']:.3f}",
            "",
            "",
            "",
        ]
    ]
    for name, (rows, wall) in results.items():
        best = max(rows, key=lambda r: r["accuracy"])
        table.append(
            [
                name,
                f"{rows[-1]['accuracy']:.3f}",
                f"{rows[-1]['auc']:.3f}",
                f"{best['accuracy']:.3f} ({best['round']})",
                f"{rows[-1]['balanced_accuracy']:.3f}",
                f"{wall:.0f}",
            ]
        )
    with (out / "table.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in table]
    title = (
        f"PneumoniaMNIST 28 px, ResNet-18, {args.rounds} rounds x 1 local epoch, seed {args.seed}, "
        f"{os.cpu_count()} CPU cores"
    )
    (out / "table.md").write_text(f"{title}\n\n" + "\n".join(markdown) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, ax in zip(("accuracy", "auc"), axes):
        for name, (rows, _) in results.items():
            ax.plot([r["round"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=name)
        ax.axhline(PUBLISHED[key], color="k", ls="--", lw=1, label="MedMNIST v2 (centralised)")
        ax.set(xlabel="round (= local epochs)", ylabel=f"test {key}", ylim=(0.3 if key == "accuracy" else 0.5, 1.0))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    print(f"\n{title}\n")
    print("\n".join(markdown))
    print(f"\nwritten: {out / 'table.md'}, {out / 'table.csv'}, {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
