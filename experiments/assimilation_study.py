"""Domain assimilation (Chen & Luo, PAKDD 2024) as federations: does putting texture and colour
modules in front of the backbone make the model harder to attack, centrally and federated?

Rows (ROWS below)
    baseline              no modules, plain training
    texture, colour, both the modules that `model.assimilation` names, cross entropy + GLCM
                          texture loss (assimilation.texture_weight = 1)
    both_no_texture_loss  both modules, assimilation.texture_weight = 0
    both_fgsm_at          both modules + FGSM adversarial training (defense=fgsm_at)
Settings
    central    one client holding the whole training split
    federated  5 clients, Dirichlet(0.5) label skew
Each (dataset, seed, setting, row) is one `python -m fedmed` run; afterwards its final global
model is attacked here, in pixel space, through the whole model (modules included), on a fixed
subset of the test split:

* clean accuracy, balanced accuracy, AUC;
* accuracy, balanced accuracy and AUC under FGSM, BIM, MI-FGSM and PGD (L-inf) at 1, 2, 4 and
  8/255, and the attack success rate on the images the model classifies correctly (share of them
  the attack turns wrong);
* gradient-masking checks (Athalye et al. 2018; Carlini et al. 2019): PGD <= BIM <= FGSM
  accuracy at every eps (0.02 of slack for sampling noise), PGD accuracy at 64/255 (should be
  near zero), PGD with 10x the steps at 8/255 not above PGD, a transfer attack (PGD crafted on
  the baseline of the same dataset, setting and seed) not stronger than the white-box PGD, and
  the mean L2 norm of the input gradient of the loss beside the baseline's.

No module uses a non-differentiable operation (tanh, convolutions, GroupNorm, bilinear
resizing), so the attacks need no BPDA.

Configurations (CONFIGS below)
    quick  CPU: ResNet18 from scratch at 28 px, PneumoniaMNIST (X-ray), RetinaMNIST (fundus) and
           BreastMNIST (ultrasound) unless --datasets says otherwise, Adam 1e-3, rounds x local
           epochs per dataset from probe runs of the undefended model (PneumoniaMNIST 5 x 2,
           BreastMNIST 30 x 1, RetinaMNIST 20 x 1), GroupNorm (model.norm=group), class-balanced
           batches (client.balanced_sampling), FGSM-AT's eps warmed up over 3 rounds, attacks
           with 5 steps on 128 test images, seeds 0, 1, 2.
    full   GPU: DenseNet121, MobileNetV2 and ResNet50 (--models), 64 px (the *_64.npz MedMNIST+
           files in --root), ImageNet weights (torchvision's cache, or `--weights ARCH=PATH`,
           passed as model.weights_path), backbone frozen for the first 2 rounds
           (assimilation.freeze_backbone_rounds), 20 rounds, attacks with 10 steps on the whole
           test split, seeds 0, 1, 2.

    python -m experiments.assimilation_study [--config quick|full] [--datasets D ...]
        [--settings central federated] [--rows R ...] [--seeds 0 1 2] [--root DIR] [--out DIR]

Written to --out: `<dataset>/<setting>/seed<k>/<row>/` (each run's fedmed outputs and
`assessment.json`; a run or an assessment already there is skipped, so an interrupted study
resumes; `--table-only` tabulates what is there), `table.csv` (every seed), `table.md` (mean +- sd
over seeds) and `assimilation.png`.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.study_runs import (  # noqa: E402
    FINISHED,
    LEARNED_AUC,
    LEARNED_MARGIN,
    cell,
    has_learned,
    learned_mark,
    mean_sd,
    num_classes,
    overrides,
    report,
    run_once,
    run_status,
    study_parser,
)
from fedmed.adversarial_eval import fixed_subset  # noqa: E402
from fedmed.data import load_dataset  # noqa: E402
from fedmed.evasion import eval_mode  # noqa: E402
from fedmed.evasion.bim import bim  # noqa: E402
from fedmed.evasion.fgsm import fgsm  # noqa: E402
from fedmed.evasion.mifgsm import mifgsm  # noqa: E402
from fedmed.evasion.pgd import pgd  # noqa: E402
from fedmed.metrics import classification_metrics  # noqa: E402
from fedmed.models import build_model  # noqa: E402
from fedmed.serialization import load_model_file  # noqa: E402

DATASETS = ["breastmnist", "pneumoniamnist", "retinamnist"]
ROWS = {
    "baseline": {"model.assimilation": "none"},
    "texture": {"model.assimilation": "texture"},
    "colour": {"model.assimilation": "colour"},
    "both": {"model.assimilation": "both"},
    "both_no_texture_loss": {"model.assimilation": "both", "assimilation.texture_weight": 0.0},
    "both_fgsm_at": {"model.assimilation": "both", "defense": "fgsm_at"},
}
SETTINGS = {
    "central": {"federation.num_clients": 1, "federation.clients_per_round": 1, "partition": "iid"},
    "federated": {
        "federation.num_clients": 5,
        "federation.clients_per_round": 5,
        "partition": "dirichlet",
        "partition.alpha": 0.5,
    },
}
ATTACKS = ["fgsm", "bim", "mifgsm", "pgd"]
EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]
LARGE_EPS = 64 / 255
SLACK = 0.02  # accuracy difference read as sampling noise in the ordering checks

COMMON = {
    "client.optimizer": "adam",
    "client.lr": 0.001,
    "eval.attacks": ["fgsm"],
    "eval.eps": [8 / 255],
    "eval.clients": False,
    "defense.eps": 4 / 255,  # training epsilon of the both_fgsm_at row, reached by a linear warm-up
    "defense.warmup_rounds": 3,
    # the federated clients' skewed shares pulled the model to one class without it (README)
    "client.balanced_sampling": True,
}
CONFIGS = {
    "quick": {
        "models": ["resnet18"],
        "datasets": DATASETS,
        "seeds": [0, 1, 2],
        "samples": 128,
        "steps": 5,
        "overrides": {
            **COMMON,
            # FedAvg's averaged BatchNorm statistics under the Dirichlet label skew left the
            # federated baseline answering one class although its scores ranked well (README);
            # GroupNorm learned. Both settings use it, so that they differ only in the federation.
            "model.norm": "group",
            "eval.max_samples": 128,
            "device": "cpu",
            "ray.num_cpus_per_client": 1,
        },
        # (rounds, local epochs) per dataset, from probe runs of the undefended model (README)
        "schedule": {"pneumoniamnist": (5, 2), "breastmnist": (30, 1), "retinamnist": (20, 1)},
    },
    "full": {
        "models": ["densenet121", "mobilenet_v2", "resnet50"],
        "datasets": DATASETS,
        "seeds": [0, 1, 2],
        "samples": None,
        "steps": 10,
        "overrides": {
            **COMMON,
            "dataset.size": 64,
            "model.pretrained": True,
            "assimilation.freeze_backbone_rounds": 2,
            "eval.max_samples": None,
            "device": "cuda",
            "ray.num_gpus_per_client": 0.2,
        },
        "schedule": {name: (20, 1) for name in DATASETS},
    },
}


def schedule_of(config: dict, dataset: str) -> tuple[int, int]:
    """(rounds, local epochs) of ``dataset`` in ``config`` (10 x 1 for a dataset it does not list)."""
    return config["schedule"].get(dataset, (10, 1))


def eps_label(eps: float) -> str:
    return f"{round(eps * 255)}/255"


def load_run_model(run_dir: Path, num_classes: int, channels: int) -> torch.nn.Module:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = build_model(
        str(cfg.model.name), num_classes, channels, norm=str(cfg.model.norm), assimilation=str(cfg.model.assimilation)
    )
    load_model_file(model, run_dir / "model.safetensors")
    return model.eval()


def input_gradient_norm(model, x, y) -> float:
    x = x.clone().requires_grad_(True)
    with eval_mode(model):
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return float(grad.flatten(1).norm(dim=1).mean())


def assess(model, baseline, x, y, steps: int, seed: int) -> dict:
    """Everything the table reports for one model on the batch (x, y)."""
    generator = torch.Generator().manual_seed(seed)

    def predictions(images) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model):
            return torch.softmax(model(images).double(), 1)

    def run(name: str, eps: float, target=model, n_steps: int = steps) -> torch.Tensor:
        if name == "fgsm":
            return fgsm(target, x, y, eps=eps)
        if name == "bim":
            return bim(target, x, y, eps=eps, steps=n_steps)
        if name == "mifgsm":
            return mifgsm(target, x, y, eps=eps, steps=n_steps)
        return pgd(target, x, y, eps=eps, steps=n_steps, generator=generator)

    labels = y.numpy()
    clean = predictions(x)
    result = {k: v for k, v in classification_metrics(labels, clean.numpy()).items() if k != "loss"}
    correct = clean.argmax(1) == y
    for name in ATTACKS:
        for eps in EPS:
            attacked = predictions(run(name, eps))
            wrong_after = attacked.argmax(1) != y
            result[f"{name}@{eps_label(eps)}"] = float((~wrong_after).float().mean())
            scores = classification_metrics(labels, attacked.numpy())
            result[f"bacc_{name}@{eps_label(eps)}"] = scores["balanced_accuracy"]
            result[f"auc_{name}@{eps_label(eps)}"] = scores["auc"]
            result[f"asr_{name}@{eps_label(eps)}"] = (
                float(wrong_after[correct].float().mean()) if correct.any() else None
            )
    result["ordered_pgd_bim_fgsm"] = all(
        result[f"pgd@{e}"] <= result[f"bim@{e}"] + SLACK and result[f"bim@{e}"] <= result[f"fgsm@{e}"] + SLACK
        for e in map(eps_label, EPS)
    )
    result["pgd@64/255"] = float((predictions(run("pgd", LARGE_EPS)).argmax(1) == y).float().mean())
    top = eps_label(EPS[-1])
    result["pgd_10x_steps@" + top] = float(
        (predictions(run("pgd", EPS[-1], n_steps=10 * steps)).argmax(1) == y).float().mean()
    )
    if baseline is not None:
        result["transfer_pgd@" + top] = float(
            (predictions(run("pgd", EPS[-1], target=baseline)).argmax(1) == y).float().mean()
        )
    result["input_grad_norm"] = input_gradient_norm(model, x, y)
    return result


def plot(groups: dict, path: Path, title: str) -> bool:
    panels = sorted({key[:3] for key in groups})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.9), squeeze=False, sharey=True)
    xs = [0] + [e * 255 for e in EPS]
    colours = {row: plt.get_cmap("tab10")(i) for i, row in enumerate(ROWS)}
    for ax, panel in zip(axes.flat, panels):
        majority = mean_sd([r["majority_share"] for row in ROWS for r in groups.get((*panel, row), [])])[0]
        ax.axhline(majority, color="grey", ls=":", lw=1, label="majority class")
        for row in ROWS:
            results = groups.get((*panel, row))
            if not results:
                continue
            for attack, style in (("pgd", "-"), ("fgsm", "--")):
                ys = [mean_sd([r["accuracy"] for r in results])[0]]
                ys += [mean_sd([r[f"{attack}@{eps_label(e)}"] for r in results])[0] for e in EPS]
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=colours[row],
                    marker="o" if attack == "pgd" else "s",
                    ms=3,
                    label=row if attack == "pgd" else None,
                )
        ax.set_title(" / ".join(panel), fontsize=9)
        ax.set_xlabel("eps (x/255; 0 = clean)")
        ax.set_xticks(xs)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (solid PGD, dashed FGSM)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, width=70 * len(panels)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = study_parser(__doc__, list(CONFIGS), "results/assimilation_study")
    parser.add_argument("--models", nargs="+", metavar="M")
    parser.add_argument("--datasets", nargs="+", metavar="D")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="tabulate the runs already in --out (with their assessments); start nothing new",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="ARCH=PATH",
        help="ImageNet weights per architecture (model.weights_path), full config",
    )
    args = parser.parse_args()
    config = CONFIGS[args.config]
    weights = dict(item.split("=", 1) for item in args.weights)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.root).resolve()
    models, datasets = args.models or config["models"], args.datasets or config["datasets"]
    seeds = args.seeds if args.seeds is not None else config["seeds"]
    rows = ["baseline"] + [r for r in args.rows if r != "baseline"]  # the transfer attack's source first
    torch.set_num_threads(1)  # a shared CPU: see bench_defenses.py

    records, failed = [], []
    started = time.monotonic()
    for model_name in models:
        for dataset in datasets:
            size = int(config["overrides"].get("dataset.size", 28))
            data = load_dataset(dataset, seed=0, root=str(root), size=size)
            for seed in seeds:
                picked = fixed_subset(len(data.test.labels), config["samples"], seed)
                x = torch.from_numpy(data.test.images[picked]).permute(0, 3, 1, 2).float() / 255
                y = torch.from_numpy(np.asarray(data.test.labels)[picked].astype(np.int64))
                for setting in args.settings:
                    baseline = None
                    for row in rows:
                        key = (model_name, dataset, setting, row)
                        run_dir = out / model_name / dataset / setting / f"seed{seed}" / row
                        rounds, epochs = schedule_of(config, dataset)
                        schedule = {"federation.rounds": rounds, "eval.every": rounds, "client.epochs": epochs}
                        settings = {**config["overrides"], **schedule, **SETTINGS[setting], **ROWS[row]}
                        if model_name in weights:
                            settings["model.weights_path"] = weights[model_name]
                        run_args = [
                            f"model={model_name}",
                            f"dataset={dataset}",
                            *overrides(settings),
                            f"dataset.root={root}",
                            f"seed={seed}",
                            "progress=false",
                            *args.overrides,
                        ]
                        tag = f"{'/'.join(key)} seed {seed}"
                        if args.table_only and run_status(run_dir) not in FINISHED:
                            continue
                        status = run_once(run_dir, run_args, tag)
                        if status is None:
                            failed.append((*key, str(seed)))
                            continue
                        model = load_run_model(run_dir, data.num_classes, data.channels)
                        if row == "baseline":
                            baseline = model
                        assessed = run_dir / "assessment.json"
                        if not assessed.exists():
                            result = assess(model, None if row == "baseline" else baseline, x, y, config["steps"], seed)
                            assessed.write_text(json.dumps(result, indent=1))
                        result = json.loads(assessed.read_text())
                        # a model that answers the majority class everywhere scores this much
                        majority = float(np.bincount(y.numpy()).max() / len(y))
                        records.append(
                            {
                                "model": model_name,
                                "dataset": dataset,
                                "setting": setting,
                                "row": row,
                                "seed": seed,
                                "majority_share": majority,
                                **result,
                            }
                        )
                        print(
                            f"{tag}: ACC {result['accuracy']:.3f} BACC {result['balanced_accuracy']:.3f} "
                            f"PGD@2/255 {result['pgd@2/255']:.3f} -- {status}",
                            flush=True,
                        )
    return write_outputs(out, records, failed, args.config, config, time.monotonic() - started)


def write_outputs(out: Path, records: list[dict], failed: list, name: str, config: dict, seconds: float) -> int:
    columns = sorted(
        {k for r in records for k in r}, key=lambda k: (k not in ("model", "dataset", "setting", "row", "seed"), k)
    )
    with (out / "table.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["dataset"], r["setting"], r["row"]), []).append(r)
    shown = [
        "majority_share",
        "accuracy",
        "balanced_accuracy",
        "auc",
        *[f"{a}@{eps_label(e)}" for a in ATTACKS for e in EPS],
        "asr_pgd@2/255",
        "bacc_pgd@8/255",
        "auc_pgd@8/255",
    ]
    header = [
        "model",
        "dataset",
        "setting",
        "row",
        "seeds",
        "learned",
        "majority",
        "ACC",
        "BACC",
        "AUC",
        *[f"{a.upper()} {eps_label(e)}" for a in ATTACKS for e in EPS],
        "ASR PGD 2/255",
        "BACC PGD 8/255",
        "AUC PGD 8/255",
    ]
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * 6 + "---:|" * (len(header) - 6)]
    top = eps_label(EPS[-1])
    checks = [
        "| model | dataset | setting | row | PGD <= BIM <= FGSM | PGD 64/255 | PGD 8/255 | PGD 10x steps "
        "8/255 | transfer PGD 8/255 | input-grad norm (x baseline) |",
        "|" + "---|" * 10,
    ]

    def learned(key) -> bool | None:
        results = groups.get(key, [])
        return has_learned([r["balanced_accuracy"] for r in results], [r["auc"] for r in results], num_classes(key[1]))

    for key, results in groups.items():
        mark = learned_mark(learned(key), None if key[3] == "baseline" else learned((*key[:3], "baseline")))
        values = [cell([r.get(c) for r in results]) for c in shown]
        markdown.append("| " + " | ".join([*key, str(len(results)), mark, *values]) + " |")
        base = groups.get((*key[:3], "baseline"))
        ratio = (
            (mean_sd([r["input_grad_norm"] for r in results])[0] / mean_sd([r["input_grad_norm"] for r in base])[0])
            if base
            else None
        )
        checks.append(
            "| "
            + " | ".join(
                [
                    *key,
                    "yes" if all(r["ordered_pgd_bim_fgsm"] for r in results) else "NO",
                    cell([r["pgd@64/255"] for r in results]),
                    cell([r[f"pgd@{top}"] for r in results]),
                    cell([r[f"pgd_10x_steps@{top}"] for r in results]),
                    cell([r.get(f"transfer_pgd@{top}") for r in results]),
                    "" if ratio is None else f"{ratio:.2f}",
                ]
            )
            + " |"
        )
    markdown += ["", "Gradient-masking checks:", "", *checks]
    datasets = sorted({r["dataset"] for r in records})
    schedule = ", ".join("{} {} x {}".format(d, *schedule_of(config, d)) for d in datasets)
    title = (
        f"assimilation study, config {name}: rounds x local epochs {schedule}; attacks with "
        f"{config['steps']} steps on {config['samples'] or 'all'} test images"
    )
    note = (
        f"learned: the row's balanced accuracy on the attacked images is at least {LEARNED_MARGIN:.2f} above "
        f"chance and its AUC at least {LEARNED_AUC:.2f}; a row whose baseline did not learn says nothing "
        "about the modules' robustness. "
        "majority: accuracy of a model that answers the majority class everywhere, on the attacked images. "
        "Accuracy under attack, white-box through the whole model (modules included), pixel-space L-inf "
        "eps; ASR: share of the correctly classified images the attack turns wrong; mean ± sd over seeds."
    )
    figure = out / "assimilation.png"
    drawn = plot(groups, figure, title)
    return report(out, title, markdown, note, figure if drawn else None, failed, seconds)


if __name__ == "__main__":
    sys.exit(main())
