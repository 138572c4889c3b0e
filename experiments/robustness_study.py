"""The seed paper's robustness study, run as federations.

Seed paper: "Towards More Robust and Scalable Deep Learning Systems for Medical Image Analysis"
(IEEE BigData 2024). It fine-tunes DenseNet121, MobileNet-V2 and ResNet50 on medical datasets of
different sizes, attacks them with FGSM and defends them with adversarial training and knowledge
distillation. Here every (model, dataset, defence) setting is a fedmed federation (FedAvg, IID
clients, each client applying the defence in its local training), and the server assesses the
final global model under FGSM and PGD at several epsilons.

Grid (each list can be restricted on the command line):

* models    densenet121, mobilenet_v2, resnet50
* datasets  pneumoniamnist (5,856 images, 2 classes), breastmnist (780, 2), retinamnist (1,600, 5)
* defences  none                plain local training
            fgsm_at             FGSM adversarial training (Goodfellow et al. 2015), half clean loss
            fast_at             "fast" FGSM AT from a random start (Wong et al. 2020)
            distillation        defensive distillation (Papernot et al., S&P 2016), fedmed's
                                `defense.mode=defensive`: each client trains a teacher at
                                temperature T (fedmed/defenses/distillation.py: T = 20) and its
                                model on the teacher's soft labels at T -- the seed paper's setting.
                                High-temperature distillation is known to mask gradients (Carlini &
                                Wagner 2016, "Defensive distillation is not robust to adversarial
                                examples"): saturated softmax outputs give FGSM near-zero gradients.
                                Read its FGSM numbers only with the PGD numbers beside them.

Configurations (CONFIGS below; edit the override dicts to change any value):

* quick  CPU, minutes per run: mobilenet_v2 only unless --models says otherwise (the fastest on
         CPU), 28 px, from scratch, 3 IID clients, 5 rounds x 2 local epochs (Adam 1e-3), robustness assessed
         on a fixed 128-image subset of the test split, training eps 4/255.
* full   for a GPU: all three models, ImageNet-pretrained, 224 px, 10 IID clients, 20 rounds,
         the whole test split, device=cuda, 4 clients per GPU (ray.num_gpus_per_client=0.25),
         training eps 4/255. It needs the 224 px MedMNIST files (pneumoniamnist_224.npz, ...)
         in --root and torchvision's ImageNet weights (downloaded, or in the TORCH_HOME cache);
         neither is available on the offline development machine, which has only the 28 px
         files in ../shared/data/medmnist.

Both assess FGSM and PGD at eps 1/255, 2/255, 4/255 and 8/255 (pixel scale: inputs are in
[0, 1], normalisation lives inside the model).

How to run:

    python -m experiments.robustness_study [--config quick|full] [--root ../shared/data/medmnist]
        [--out results/robustness_study] [--seed 0] [--models M ...] [--datasets D ...]
        [--defenses D ...] [--rounds N] [--set KEY=VALUE ...]

e.g. a two-run smoke test:

    python -m experiments.robustness_study --models mobilenet_v2 --datasets breastmnist \\
        --defenses none fast_at --rounds 1 --out /tmp/rs_smoke

`--rounds N` overrides federation.rounds and eval.every (robustness is then assessed at round 0
and after round N only). `--set key=value ...` passes further Hydra overrides to every run,
after the configuration's (e.g. `--set defense.temperature=50 client.lr=0.05`).

What gets written to --out:

* `<model>/<dataset>/<defense>/`  each run's fedmed outputs (config.yaml, metrics.jsonl,
  summary.json, plots/, the model) plus stdout.log / stderr.log. A run whose summary.json
  exists is skipped, so an interrupted study resumes where it stopped (delete the folder, or use
  another --out, after changing the configuration).
* `table.csv`  one row per run: model, dataset, defense, clean accuracy and AUC, accuracy under
  fgsm@1/255 ... pgd@8/255, wall_time_s -- all from the last row of metrics.jsonl and summary.json.
* `table.md`   the same as a markdown table (3 decimals); also printed at the end.
* `robustness.png`  one panel per (model, dataset): accuracy against epsilon (in /255; 0 = clean
  accuracy on the same assessed images), one colour per defence, solid PGD, dashed FGSM (the
  defences' lines are shifted a hair sideways so that equal values stay visible).

The exit code is non-zero if any run failed; the others still run and are tabulated.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from experiments.study_runs import fmt, overrides, report, run_once, study_parser  # noqa: E402

MODELS = ["densenet121", "mobilenet_v2", "resnet50"]
DATASETS = ["pneumoniamnist", "breastmnist", "retinamnist"]
DEFENSES = ["none", "fgsm_at", "fast_at", "distillation"]
ATTACKS = ["fgsm", "pgd"]
EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]  # assessment epsilons (pixel scale)

CONFIGS = {
    # CPU: small, from scratch, 28 px; robustness on a fixed 128-image subset of the test split at
    # round 0 and after the last round only. With SGD 0.01 and 5 clients x 3 rounds x 1 epoch,
    # MobileNetV2 never left the majority class on BreastMNIST (probe run), so the quick study
    # uses 3 clients, 5 rounds of 2 epochs and Adam 1e-3.
    "quick": {
        "models": ["mobilenet_v2"],
        "overrides": {
            "federation.num_clients": 3,
            "federation.clients_per_round": 3,
            "client.optimizer": "adam",
            "client.lr": 0.001,
            "federation.rounds": 5,
            "client.epochs": 2,
            "partition": "iid",
            "eval.max_samples": 128,
            "eval.every": 5,
            "eval.clients": False,
            "eval.attacks": ATTACKS,
            "eval.eps": EPS,
            "defense.eps": 4 / 255,  # training epsilon
            "device": "cpu",
        },
    },
    # GPU (documented, not run here): ImageNet-pretrained at 224 px as in the seed paper, needs
    # the 224 px MedMNIST files and torchvision's weights; whole test split; 4 clients per GPU.
    "full": {
        "models": MODELS,
        "overrides": {
            "model.pretrained": True,
            "dataset.size": 224,
            "federation.num_clients": 10,
            "federation.clients_per_round": 10,
            "federation.rounds": 20,
            "client.epochs": 1,
            "partition": "iid",
            "eval.max_samples": None,
            "eval.every": 5,
            "eval.clients": False,
            "eval.attacks": ATTACKS,
            "eval.eps": EPS,
            "defense.eps": 4 / 255,  # training epsilon
            "device": "cuda",
            "ray.num_gpus_per_client": 0.25,
        },
    },
}


def eps_key(eps: float) -> str:
    """As in metric names (fedmed.adversarial_eval.eps_key): four decimals."""
    return f"{eps:.4f}"


def eps_label(eps: float) -> str:
    """8/255 -> "8/255" (one decimal when not a whole number of 255ths)."""
    n = eps * 255
    return f"{round(n):d}/255" if math.isclose(n, round(n), abs_tol=1e-6) else f"{n:.1f}/255"


def column(attack: str, eps: float) -> str:
    return f"{attack}@{eps_label(eps)}"


def read_run(run_dir: Path, eps_values: list[float]) -> dict:
    """Clean and robust scores of the last row of metrics.jsonl, and the wall time."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "round": last.get("round"),
        "accuracy": last.get("accuracy"),
        "auc": last.get("auc"),
        "clean_assessed": last.get("adv/none/0.0000/accuracy"),
        "wall_time_s": summary.get("wall_time_s"),
    }
    for attack in ATTACKS:
        for eps in eps_values:
            result[column(attack, eps)] = last.get(f"adv/{attack}/{eps_key(eps)}/accuracy")
    return result


def plot(results: dict, eps_values: list[float], defenses: list[str], path: Path, title: str) -> bool:
    panels = sorted(
        {(m, d) for (m, d, _) in results},
        key=lambda p: (MODELS.index(p[0]) if p[0] in MODELS else 99, DATASETS.index(p[1]) if p[1] in DATASETS else 99),
    )
    if not panels:
        return False
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False, sharey=True)
    colours = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(defenses)}
    styles = {"pgd": "-", "fgsm": "--"}
    markers = {"pgd": "o", "fgsm": "s"}
    xs = [0.0] + [e * 255 for e in eps_values]
    # a slight horizontal dodge per defence, so that equal values do not hide each other
    dodge = {d: 0.012 * max(xs) * (i - (len(defenses) - 1) / 2) for i, d in enumerate(defenses)}
    for ax, (model, dataset) in zip(axes.flat, panels):
        for defense in defenses:
            r = results.get((model, dataset, defense))
            if r is None:
                continue
            clean = r["clean_assessed"] if r["clean_assessed"] is not None else r["accuracy"]
            for attack in ATTACKS:
                ys = [clean] + [r[column(attack, e)] for e in eps_values]
                pts = [(x + dodge[defense], y) for x, y in zip(xs, ys) if y is not None]
                if len(pts) < 2:
                    continue
                ax.plot(*zip(*pts), color=colours[defense], ls=styles[attack], marker=markers[attack], ms=4, lw=1.5)
        ax.set_title(f"{model} / {dataset}", fontsize=10)
        ax.set_xlabel("epsilon (x/255; 0 = clean)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[d], lw=2, label=d) for d in defenses if any(k[2] == d for k in results)]
    handles += [Line2D([], [], color="k", ls=styles[a], marker=markers[a], ms=4, label=a.upper()) for a in ATTACKS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(textwrap.fill(title, width=int(55 * ncols)), fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = study_parser(__doc__, list(CONFIGS), "results/robustness_study")
    parser.add_argument("--models", nargs="+", metavar="M", help=f"subset of {MODELS} (default: the config's)")
    parser.add_argument("--datasets", nargs="+", metavar="D", default=DATASETS, help=f"default: {DATASETS}")
    parser.add_argument("--defenses", nargs="+", metavar="D", default=DEFENSES, help=f"default: {DEFENSES}")
    parser.add_argument("--rounds", type=int, help="override federation.rounds and eval.every")
    args = parser.parse_args()

    config = CONFIGS[args.config]
    settings = dict(config["overrides"])
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        settings["federation.rounds"] = args.rounds
        settings["eval.every"] = args.rounds
    eps_values = [float(e) for e in settings.get("eval.eps", EPS)]
    models = args.models or config["models"]
    out = Path(args.out).resolve()  # the runs start in the repository root
    out.mkdir(parents=True, exist_ok=True)
    common = [f"dataset.root={Path(args.root).resolve()}", f"seed={args.seed}", "progress=false", *args.overrides]

    grid = [(m, d, f) for m in models for d in args.datasets for f in args.defenses]
    results: dict[tuple[str, str, str], dict] = {}
    failed: list[tuple[str, str, str]] = []
    started_all = time.monotonic()
    for i, (model, dataset, defense) in enumerate(grid, 1):
        run_dir = out / model / dataset / defense
        tag = f"[{i}/{len(grid)}] {model} / {dataset} / {defense}"
        run_args = [f"model={model}", f"dataset={dataset}", *overrides({**settings, "defense": defense}), *common]
        status = run_once(run_dir, run_args, tag)
        if status is None:
            failed.append((model, dataset, defense))
            continue
        try:
            r = results[(model, dataset, defense)] = read_run(run_dir, eps_values)
        except (OSError, ValueError, IndexError, KeyError) as exc:
            failed.append((model, dataset, defense))
            print(f"{tag}: cannot read its outputs in {run_dir}: {exc!r}", flush=True)
            continue
        worst = column("pgd", eps_values[-1]) if eps_values else None
        print(
            f"{tag}: accuracy {fmt(r['accuracy'])}, AUC {fmt(r['auc'])}"
            + (f", {worst} {fmt(r[worst])}" if worst else "")
            + f" -- {status}",
            flush=True,
        )

    cols = [column(a, e) for a in ATTACKS for e in eps_values]
    header = ["model", "dataset", "defense", "accuracy", "auc", *cols, "wall_time_s"]
    records = [
        [m, d, f, r["accuracy"], r["auc"], *(r[c] for c in cols), r["wall_time_s"]] for (m, d, f), r in results.items()
    ]
    with (out / "table.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *[["" if v is None else v for v in rec] for rec in records]])

    rounds = settings.get("federation.rounds")
    title = (
        f"robustness study, config {args.config}: {rounds} round{'s' if rounds != 1 else ''}, "
        f"{settings.get('federation.num_clients')} clients, training eps "
        f"{eps_label(float(settings.get('defense.eps', 0.0314)))}, seed {args.seed}; "
        f"attacks on {settings.get('eval.max_samples') or 'all'} test images"
    )
    md_header = [
        "model",
        "dataset",
        "defense",
        "ACC",
        "AUC",
        *[f"{a.upper()} {eps_label(e)}" for a in ATTACKS for e in eps_values],
        "wall s",
    ]
    markdown = ["| " + " | ".join(md_header) + " |", "|" + "---|" * 3 + "---:|" * (len(md_header) - 3)]
    for rec in records:
        markdown.append("| " + " | ".join([*rec[:3], *(fmt(v) for v in rec[3:-1]), fmt(rec[-1], 0)]) + " |")
    note = (
        "ACC/AUC: clean, whole test split; attack columns: accuracy under attack on the assessed "
        "images. distillation = defensive distillation (Papernot et al. 2016), which masks "
        "gradients (Carlini & Wagner 2016): read its FGSM numbers with PGD beside them."
    )
    figure = out / "robustness.png"
    drawn = plot(results, eps_values, args.defenses, figure, title)
    return report(out, title, markdown, note, figure if drawn else None, failed, time.monotonic() - started_all)


if __name__ == "__main__":
    sys.exit(main())
