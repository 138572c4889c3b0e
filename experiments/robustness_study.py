"""The seed paper's robustness study, run as federations.

Seed paper: "Towards More Robust and Scalable Deep Learning Systems for Medical Image Analysis"
(IEEE BigData 2024). It fine-tunes DenseNet121, MobileNet-V2 and ResNet50 on medical datasets of
different sizes, attacks them with FGSM and defends them with adversarial training and knowledge
distillation. Here every (model, dataset, defence) setting is a fedmed federation (FedAvg, IID
clients, each client applying the defence in its local training), and the server assesses the
final global model under FGSM and PGD at several epsilons.

Grid (each list can be restricted on the command line):

* models    densenet121, mobilenet_v2, resnet50 (the seed paper's; full), resnet18 (quick)
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

* quick  CPU: ResNet18 from scratch at 28 px, 4 IID clients, Adam 1e-3, as many passes over
         the data as the undefended model needs to learn each dataset (CONFIGS, rounds x local
         epochs: PneumoniaMNIST 5 x 2, BreastMNIST 10 x 3, RetinaMNIST 20 x 1), training eps 4/255
         reached by a linear warm-up over 3 rounds (defense.warmup_rounds), robustness assessed at
         round 0 and after the last round on a fixed 128-image subset of the test split, seeds 0,
         1 and 2.
* full   for a GPU: DenseNet121, MobileNetV2 and ResNet50, ImageNet-pretrained, 224 px, 10 IID
         clients, 20 rounds, the whole test split, device=cuda, 4 clients per GPU
         (ray.num_gpus_per_client=0.25), training eps 4/255, seeds 0, 1, 2. It needs the 224 px
         MedMNIST files (pneumoniamnist_224.npz, ...) in --root and torchvision's ImageNet
         weights (downloaded, or in the TORCH_HOME cache); neither is available on the offline
         development machine, which has only the 28 px files in ../shared/data/medmnist.

Both assess FGSM and PGD at eps 1/255, 2/255, 4/255 and 8/255 (pixel scale: inputs are in
[0, 1], normalisation lives inside the model), and report under each attack accuracy, balanced
accuracy, AUC and the attack's success on the images the model classified correctly: accuracy
alone flatters a model that answers the majority class for nearly everything. A model has
"learned" when its clean balanced accuracy is at least 0.10 above chance (LEARNED_MARGIN); a
dataset whose undefended model has not is marked in the table, as its rows say nothing about the
defences.

How to run:

    python -m experiments.robustness_study [--config quick|full] [--root ../shared/data/medmnist]
        [--out results/robustness_study] [--seeds 0 1 2] [--models M ...] [--datasets D ...]
        [--defenses D ...] [--rounds N] [--table-only] [--set KEY=VALUE ...]

e.g. a two-run smoke test:

    python -m experiments.robustness_study --datasets breastmnist --defenses none fast_at \
        --seeds 0 --rounds 1 --out /tmp/rs_smoke

`--rounds N` overrides every dataset's federation.rounds and eval.every (not its local epochs). `--set key=value ...`
passes further Hydra overrides to every run, after the configuration's (e.g. `--set
defense.temperature=50 client.lr=0.05`). `--table-only` tabulates the runs already in --out.

What gets written to --out:

* `<model>/<dataset>/<defense>/seed<k>/`  each run's fedmed outputs (config.yaml, metrics.jsonl,
  summary.json, plots/, the model) plus stdout.log / stderr.log. A finished run is skipped and
  one stopped part-way is continued from its checkpoint (fedmed's `resume=`), so an interrupted
  study resumes where it stopped (delete the folder, or use another --out, after changing the
  configuration).
* `table.csv`  one row per run and seed: clean accuracy, balanced accuracy and AUC, then every
  score under fgsm@1/255 ... pgd@8/255, wall_time_s -- from the last row of metrics.jsonl and
  summary.json.
* `table.md`   mean ± sd over seeds: the clean scores with the "learned" mark, then one table
  per score under attack (ACC, BACC, AUC, ASR); also printed at the end.
* `robustness.png`  per (model, dataset), mean accuracy (top) and balanced accuracy (bottom)
  against epsilon (in /255; 0 = clean, on the same assessed images), one colour per defence,
  solid PGD, dashed FGSM (the defences' lines are shifted a hair sideways so that equal values
  stay visible).

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

from experiments.study_runs import (  # noqa: E402
    FINISHED,
    LEARNED_AUC,
    LEARNED_MARGIN,
    cell,
    fmt,
    has_learned,
    learned_mark,
    mean_sd,
    num_classes,
    overrides,
    report,
    run_once,
    run_status,
    study_parser,
)  # noqa: E402

MODELS = ["densenet121", "mobilenet_v2", "resnet50", "resnet18"]
DATASETS = ["pneumoniamnist", "breastmnist", "retinamnist"]
DEFENSES = ["none", "fgsm_at", "fast_at", "distillation"]
ATTACKS = ["fgsm", "pgd"]
EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]  # assessment epsilons (pixel scale)
# what the server's assessment writes per attack and eps (fedmed.adversarial_eval), as headed here
SCORES = {"accuracy": "ACC", "balanced_accuracy": "BACC", "auc": "AUC", "success_rate": "ASR"}
CONFIGS = {
    # CPU: ResNet18 from scratch at 28 px, 4 IID clients (two waves of actors on 2 cores), the
    # passes over its data each dataset needs for the undefended model to learn it (README: probe
    # runs), in few rounds of several local epochs (a round has seconds of fixed cost), training eps
    # 4/255 reached by a linear warm-up, robustness on a fixed 128-image subset of the test split
    # after the last round only, seeds 0, 1, 2.
    "quick": {
        "models": ["resnet18"],
        "seeds": [0, 1, 2],
        "overrides": {
            "federation.num_clients": 4,
            "federation.clients_per_round": 4,
            "client.optimizer": "adam",
            "client.lr": 0.001,
            "partition": "iid",
            "eval.max_samples": 128,
            "eval.clients": False,
            "eval.attacks": ATTACKS,
            "eval.eps": EPS,
            "defense.eps": 4 / 255,  # training epsilon
            "defense.warmup_rounds": 3,
            "device": "cpu",
        },
        # (rounds, local epochs) per dataset (eval.every follows the rounds): the small sets need
        # more passes over their data
        "schedule": {"pneumoniamnist": (5, 2), "breastmnist": (10, 3), "retinamnist": (20, 1)},
    },
    # GPU (documented, not run here): ImageNet-pretrained at 224 px as in the seed paper, needs
    # the 224 px MedMNIST files and torchvision's weights; whole test split; 4 clients per GPU.
    "full": {
        "models": MODELS[:3],
        "seeds": [0, 1, 2],
        "overrides": {
            "model.pretrained": True,
            "dataset.size": 224,
            "federation.num_clients": 10,
            "federation.clients_per_round": 10,
            "partition": "iid",
            "eval.max_samples": None,
            "eval.clients": False,
            "eval.attacks": ATTACKS,
            "eval.eps": EPS,
            "defense.eps": 4 / 255,  # training epsilon
            "defense.warmup_rounds": 3,
            "device": "cuda",
            "ray.num_gpus_per_client": 0.25,
        },
        "schedule": {name: (20, 1) for name in DATASETS},
    },
}


def eps_key(eps: float) -> str:
    """As in metric names (fedmed.adversarial_eval.eps_key): four decimals."""
    return f"{eps:.4f}"


def eps_label(eps: float) -> str:
    """8/255 -> "8/255" (one decimal when not a whole number of 255ths)."""
    n = eps * 255
    return f"{round(n):d}/255" if math.isclose(n, round(n), abs_tol=1e-6) else f"{n:.1f}/255"


def column(attack: str, eps: float, score: str = "accuracy") -> str:
    return f"{attack}@{eps_label(eps)}" + ("" if score == "accuracy" else f"/{score}")


def read_run(run_dir: Path, eps_values: list[float]) -> dict:
    """Clean scores (whole test split) and scores under attack (the assessed images) of the last
    row of metrics.jsonl, and the wall time."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "round": last.get("round"),
        "accuracy": last.get("accuracy"),
        "balanced_accuracy": last.get("balanced_accuracy"),
        "auc": last.get("auc"),
        "clean_assessed": last.get("adv/none/0.0000/accuracy"),
        "clean_assessed/balanced_accuracy": last.get("adv/none/0.0000/balanced_accuracy"),
        "wall_time_s": summary.get("wall_time_s"),
    }
    for attack in ATTACKS:
        for eps in eps_values:
            for score in SCORES:
                result[column(attack, eps, score)] = last.get(f"adv/{attack}/{eps_key(eps)}/{score}")
    return result


def tables(runs: dict, eps_values: list[float], defenses: list[str]) -> tuple[list[str], list[list]]:
    """Markdown tables (clean scores, then one per score under attack) and the csv records.

    ``runs`` maps (model, dataset, defense) to the list of its seeds' ``read_run`` results.
    """
    groups = sorted({(m, d) for (m, d, _) in runs}, key=lambda g: (_order(MODELS, g[0]), _order(DATASETS, g[1])))
    keyed = [(m, d, f) for m, d in groups for f in defenses if (m, d, f) in runs]

    def learned(key) -> bool | None:
        seeds = runs.get(key, [])
        return has_learned([r["balanced_accuracy"] for r in seeds], [r["auc"] for r in seeds], num_classes(key[1]))

    head = ["model", "dataset", "defense", "seeds", "learned", "ACC", "BACC", "AUC", "wall s"]
    markdown = ["**Clean, whole test split**", "", "| " + " | ".join(head) + " |", "|" + "---|" * 5 + "---:|" * 4]
    for key in keyed:
        seeds = runs[key]
        values = [cell([r[k] for r in seeds]) for k in ("accuracy", "balanced_accuracy", "auc")]
        wall = mean_sd([r["wall_time_s"] for r in seeds])[0]
        mark = learned_mark(learned(key), None if key[2] == "none" else learned((*key[:2], "none")))
        markdown.append("| " + " | ".join([*key, str(len(seeds)), mark, *values, fmt(wall, 0)]) + " |")
    for score, short in SCORES.items():
        what = "attack success on the images right when clean" if score == "success_rate" else f"{short} under attack"
        cols = [(a, e) for a in ATTACKS for e in eps_values]
        head = ["model", "dataset", "defense", *(["clean"] if score in ("accuracy", "balanced_accuracy") else [])]
        head += [f"{a.upper()} {eps_label(e)}" for a, e in cols]
        markdown += ["", f"**{short}: {what}, assessed test images**", "", "| " + " | ".join(head) + " |"]
        markdown.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        for key in keyed:
            seeds = runs[key]
            clean_key = "clean_assessed" if score == "accuracy" else "clean_assessed/balanced_accuracy"
            row = [*key]
            if score in ("accuracy", "balanced_accuracy"):
                row.append(cell([r[clean_key] for r in seeds]))
            row += [cell([r[column(a, e, score)] for r in seeds]) for a, e in cols]
            markdown.append("| " + " | ".join(row) + " |")

    header = ["model", "dataset", "defense", "seed", "accuracy", "balanced_accuracy", "auc"]
    header += [column(a, e, s) for a in ATTACKS for e in eps_values for s in SCORES] + ["wall_time_s"]
    records = [header]
    for key in keyed:
        for r in runs[key]:
            records.append([*key, r["seed"], *(r.get(h) for h in header[4:])])
    return markdown, records


def _order(names: list[str], name: str) -> int:
    return names.index(name) if name in names else len(names)


def plot(runs: dict, eps_values: list[float], defenses: list[str], path: Path, title: str) -> bool:
    """Mean accuracy (top) and balanced accuracy (bottom) against epsilon over seeds, one panel
    column per (model, dataset), one colour per defence, solid PGD, dashed FGSM."""
    panels = sorted({(m, d) for (m, d, _) in runs}, key=lambda p: (_order(MODELS, p[0]), _order(DATASETS, p[1])))
    if not panels:
        return False
    scores = {"accuracy": "clean_assessed", "balanced_accuracy": "clean_assessed/balanced_accuracy"}
    fig, axes = plt.subplots(
        len(scores), len(panels), figsize=(4.4 * len(panels), 3.6 * len(scores)), squeeze=False, sharey=True
    )
    colours = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(defenses)}
    styles = {"pgd": "-", "fgsm": "--"}
    markers = {"pgd": "o", "fgsm": "s"}
    xs = [0.0] + [e * 255 for e in eps_values]
    # a slight horizontal dodge per defence, so that equal values do not hide each other
    dodge = {d: 0.012 * max(xs) * (i - (len(defenses) - 1) / 2) for i, d in enumerate(defenses)}
    for row, (score, clean_key) in enumerate(scores.items()):
        for ax, (model, dataset) in zip(axes[row], panels):
            for defense in defenses:
                seeds = runs.get((model, dataset, defense))
                if not seeds:
                    continue
                for attack in ATTACKS:
                    keys = [clean_key] + [column(attack, e, score) for e in eps_values]
                    ys = [mean_sd([r[k] for r in seeds])[0] for k in keys]
                    pts = [(x + dodge[defense], y) for x, y in zip(xs, ys) if y is not None]
                    if len(pts) >= 2:
                        ax.plot(*zip(*pts), color=colours[defense], ls=styles[attack], marker=markers[attack], ms=4)
            if score == "balanced_accuracy" and num_classes(dataset):
                ax.axhline(1 / num_classes(dataset), color="grey", lw=0.8, ls=":")
            ax.set_title(f"{model} / {dataset}", fontsize=10)
            ax.set_xlabel("epsilon (x/255; 0 = clean)")
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[row, 0].set_ylabel(
            {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy (dotted: chance)"}[score]
        )
    handles = [Line2D([], [], color=colours[d], lw=2, label=d) for d in defenses if any(k[2] == d for k in runs)]
    handles += [Line2D([], [], color="k", ls=styles[a], marker=markers[a], ms=4, label=a.upper()) for a in ATTACKS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(textwrap.fill(title, width=int(55 * len(panels))), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> int:
    parser = study_parser(__doc__, list(CONFIGS), "results/robustness_study")
    parser.add_argument("--models", nargs="+", metavar="M", help=f"subset of {MODELS} (default: the config's)")
    parser.add_argument("--datasets", nargs="+", metavar="D", default=DATASETS, help=f"default: {DATASETS}")
    parser.add_argument("--defenses", nargs="+", metavar="D", default=DEFENSES, help=f"default: {DEFENSES}")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the config's; --seed K is --seeds K")
    parser.set_defaults(seed=None)
    parser.add_argument("--rounds", type=int, help="override every dataset's federation.rounds and eval.every")
    parser.add_argument(
        "--table-only", action="store_true", help="tabulate the runs already in --out; start nothing new"
    )
    args = parser.parse_args()

    config = CONFIGS[args.config]
    settings = dict(config["overrides"])
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    eps_values = [float(e) for e in settings.get("eval.eps", EPS)]
    models = args.models or config["models"]
    if args.seed is not None and args.seeds is not None:
        parser.error("give --seed or --seeds, not both")
    seeds = args.seeds if args.seeds is not None else [args.seed] if args.seed is not None else config["seeds"]
    out = Path(args.out).resolve()  # the runs start in the repository root
    out.mkdir(parents=True, exist_ok=True)
    common = [f"dataset.root={Path(args.root).resolve()}", "progress=false", *args.overrides]

    def schedule(dataset: str) -> tuple[int, int]:
        rounds, epochs = config["schedule"].get(dataset, (10, 1))
        return args.rounds or rounds, epochs

    # seeds outermost: an interrupted study has every dataset and defence at its first seeds
    grid = [(m, d, f, s) for s in seeds for m in models for d in args.datasets for f in args.defenses]
    runs: dict[tuple[str, str, str], list[dict]] = {}
    failed: list[tuple] = []
    started_all = time.monotonic()
    for i, (model, dataset, defense, seed) in enumerate(grid, 1):
        run_dir = out / model / dataset / defense / f"seed{seed}"
        tag = f"[{i}/{len(grid)}] {model} / {dataset} / {defense} / seed {seed}"
        rounds, epochs = schedule(dataset)
        run_settings = {
            **settings,
            "defense": defense,
            "federation.rounds": rounds,
            "eval.every": rounds,
            "client.epochs": epochs,
        }
        run_args = [f"model={model}", f"dataset={dataset}", f"seed={seed}", *overrides(run_settings), *common]
        if args.table_only:
            status = "table only" if run_status(run_dir) in FINISHED else None
            if status is None:
                continue
        else:
            status = run_once(run_dir, run_args, tag)
        if status is None:
            failed.append((model, dataset, defense, f"seed{seed}"))
            continue
        try:
            r = {"seed": seed, **read_run(run_dir, eps_values)}
        except (OSError, ValueError, IndexError, KeyError) as exc:
            failed.append((model, dataset, defense, f"seed{seed}"))
            print(f"{tag}: cannot read its outputs in {run_dir}: {exc!r}", flush=True)
            continue
        runs.setdefault((model, dataset, defense), []).append(r)
        worst = column("pgd", eps_values[-1]) if eps_values else None
        print(
            f"{tag}: ACC {fmt(r['accuracy'])}, BACC {fmt(r['balanced_accuracy'])}, AUC {fmt(r['auc'])}"
            + (f", {worst} {fmt(r[worst])} (BACC {fmt(r[worst + '/balanced_accuracy'])})" if worst else "")
            + f" -- {status}",
            flush=True,
        )

    markdown, records = tables(runs, eps_values, args.defenses)
    with (out / "table.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["" if v is None else v for v in rec] for rec in records])
    rounds_text = ", ".join("{} {} x {}".format(d, *schedule(d)) for d in args.datasets)
    title = (
        f"robustness study, config {args.config}: rounds x local epochs {rounds_text}; "
        f"{settings.get('federation.num_clients')} clients, training eps "
        f"{eps_label(float(settings.get('defense.eps', 0.0314)))}, seeds {', '.join(map(str, seeds))} "
        f"(mean ± sd); attacks on {settings.get('eval.max_samples') or 'all'} test images"
    )
    note = (
        f"learned: the model's clean balanced accuracy (mean over seeds) is at least "
        f"{LEARNED_MARGIN:.2f} above chance and its AUC at least {LEARNED_AUC:.2f}; a dataset whose "
        "undefended model did not learn says "
        "nothing about the defences. distillation = defensive distillation (Papernot et al. 2016), "
        "which masks gradients (Carlini & Wagner 2016): read its FGSM numbers with PGD beside them."
    )
    figure = out / "robustness.png"
    drawn = plot(runs, eps_values, args.defenses, figure, title)
    return report(out, title, markdown, note, figure if drawn else None, failed, time.monotonic() - started_all)


if __name__ == "__main__":
    sys.exit(main())
