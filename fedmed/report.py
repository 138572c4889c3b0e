"""What a run leaves behind: metrics.jsonl, summary.json, plots and the console summary table."""

from __future__ import annotations

import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

MAIN_KEYS = ("loss", "accuracy", "balanced_accuracy", "auc")
VERSIONED_PACKAGES = ("fedmed", "flwr", "torch", "torchvision", "ray", "numpy", "opacus", "scikit-learn")


def json_safe(value):
    """NaN/Inf become None so that every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure outside pyplot: no global backend switch, nothing to close (it is garbage-collected)."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and keeps the rows in memory."""

    def __init__(self, path: Path, rows: list[dict] = ()) -> None:
        """``rows``: those of a resumed run's checkpoint, written first."""
        self.path = path
        self.rows: list[dict] = list(rows)
        path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def append(self, row: dict) -> None:
        row = json_safe(row)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


SECRET_OPTIONS = ("--token",)  # Flower hands its apps a run token on their command line


def redacted(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret options replaced by ``***``."""
    out = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in SECRET_OPTIONS:
            arg = "***"
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            arg = arg.split("=", 1)[0] + "=***"
        out.append(arg)
    return out


def write_summary(path: Path, rows: list[dict], wall_time_s: float, extra: dict) -> dict:
    final = rows[-1] if rows else {}
    scored = [r for r in rows if r.get("accuracy") is not None]
    summary = {
        "final": {k: v for k, v in final.items() if k not in ("clients", "rejected", "failures", "client_eval")},
        "best_accuracy": max((r["accuracy"] for r in scored), default=None),
        "rounds": final.get("round", 0),
        "wall_time_s": wall_time_s,
        "command": " ".join(redacted(sys.argv)),
        "versions": package_versions(),
        **extra,
    }
    path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return summary


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


SHORT_NAMES = {"loss": "loss", "accuracy": "acc", "balanced_accuracy": "bal_acc", "auc": "auc"}


def round_line(row: dict, total_rounds: int, seconds_left: float | None) -> str:
    """One console line per round: the global model's test scores, clients, time and time left."""
    parts = [f"round {row['round']}/{total_rounds}"]
    parts += [f"{SHORT_NAMES[k]} {_fmt(row.get(k), 3)}" for k in MAIN_KEYS]
    if "num_clients" in row:
        parts.append(f"{row['num_clients']} clients ({len(row.get('rejected', []))} rejected)")
    if row.get("backdoor/asr") is not None:
        parts.append(f"ASR {row['backdoor/asr']:.3f}")
    if row.get("detection/flagged"):
        parts.append(f"flagged {row['detection/flagged']}")
    parts.append(f"{row['time_s']:.1f} s")
    if seconds_left is not None:
        parts.append(f"~{seconds_left:.0f} s left")
    return " | ".join(parts)


BACKDOOR_KEYS = ("backdoor/asr", "detection/tpr", "detection/fpr")


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    table.add_column("round", justify="right")
    # backdoor and detection columns only in runs that have them
    keys = (*MAIN_KEYS, *(k for k in BACKDOOR_KEYS if any(r.get(k) is not None for r in rows)), "train_loss", "time_s")
    for key in keys:
        table.add_column(key, justify="right")
    step = max(1, math.ceil(len(rows) / 25))
    shown = rows[::step] if rows[-1:] == rows[::step][-1:] else rows[::step] + rows[-1:]
    for row in shown:
        table.add_row(str(row["round"]), *(_fmt(row.get(k)) for k in keys))
    return table


def robustness_table(row: dict) -> Table | None:
    """Accuracy under each attack (rows) at each epsilon (columns) from one round's metrics."""
    scores = robust_scores(row, "accuracy")
    if not scores:
        return None
    eps_values = sorted({e for by_eps in scores.values() for e in by_eps})
    table = Table(title=f"accuracy of the global model under attack, round {row['round']}")
    table.add_column("attack")
    for eps in eps_values:
        table.add_column(f"eps {eps * 255:.0f}/255" if eps else "clean", justify="right")
    for attack, by_eps in scores.items():
        table.add_row(attack, *(_fmt(by_eps.get(e)) for e in eps_values))
    return table


def robust_scores(row: dict, metric: str) -> dict[str, dict[float, float]]:
    """``adv/<attack>/<eps>/<metric>`` keys of a row as {attack: {eps: value}}; the clean scores
    of the same images (``adv/none/0.0000/...``) are every attack's eps 0."""
    scores: dict[str, dict[float, float]] = {}
    clean = row.get(f"adv/none/0.0000/{metric}")
    for key, value in row.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "adv" and parts[1] != "none" and parts[3] == metric and value is not None:
            scores.setdefault(parts[1], {})[float(parts[2])] = value
            if clean is not None:
                scores[parts[1]].setdefault(0.0, clean)
    return scores


def print_summary(rows: list[dict], title: str, console: Console | None = None) -> None:
    if rows:
        console = console or Console()
        console.print(summary_table(rows, title))
        assessed = [r for r in rows if robust_scores(r, "accuracy")]
        if assessed:
            console.print(robustness_table(assessed[-1]))


def plot_robustness_per_round(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy under each attack per round, one panel per attack, one line per epsilon."""
    attacks = sorted({a for r in rows for a in robust_scores(r, "accuracy")})
    fig, axes = _subplots(1, len(attacks), figsize=(5 * len(attacks), 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        assessed = [
            (r["round"], robust_scores(r, "accuracy")[attack]) for r in rows if attack in robust_scores(r, "accuracy")
        ]
        ax.plot([r["round"] for r in rows], [r.get("accuracy") for r in rows], "k--", label="clean (test split)")
        for eps in sorted({e for _, by_eps in assessed for e in by_eps if e > 0}):
            points = [(rnd, by_eps[eps]) for rnd, by_eps in assessed if eps in by_eps]
            ax.plot(*zip(*points), marker="o", label=f"eps {eps * 255:.0f}/255")
        ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1.02), title=attack.upper())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: robustness per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_robustness_vs_eps(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy against epsilon at the last assessed round (eps 0 is clean accuracy); the weakest
    client's robust accuracy on its own data dashed beside it."""
    row = [r for r in rows if robust_scores(r, "accuracy")][-1]
    fig, ax = _subplots(figsize=(6, 4))
    worst = robust_scores({k.replace("/worst_client_accuracy", "/worst"): v for k, v in row.items()}, "worst")
    for attack, by_eps in robust_scores(row, "accuracy").items():
        eps_values = sorted(by_eps)
        (line,) = ax.plot(
            [e * 255 for e in eps_values],
            [by_eps[e] for e in eps_values],
            marker="o",
            label=f"{attack.upper()} (global model, test images)",
        )
        if attack in worst:
            w = sorted(worst[attack])
            ax.plot(
                [e * 255 for e in w],
                [worst[attack][e] for e in w],
                ls="--",
                marker="x",
                color=line.get_color(),
                label=f"{attack.upper()} (weakest client, own data)",
            )
    ax.set(
        xlabel="epsilon (x/255, L-inf, pixel scale)", ylabel="accuracy", ylim=(0, 1.02), title=f"round {row['round']}"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"{title}: robustness against epsilon", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_rounds(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy, balanced accuracy and AUC of the global model per round, loss beside them."""
    rounds = [r["round"] for r in rows]
    fig, (ax_score, ax_loss) = _subplots(1, 2, figsize=(10, 4))
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "AUC")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax_score.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=label)
    ax_score.set(xlabel="round", ylabel="score (test split)", ylim=(0, 1.02), title="global model")
    ax_score.grid(alpha=0.3)
    ax_score.legend()
    ax_loss.plot(rounds, [r.get("loss") for r in rows], marker="o", label="test loss")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train), marker="s", label="clients' training loss")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_backdoor_per_round(rows: list[dict], path: Path, title: str, start_round: int) -> Path:
    """Backdoor success rate and main-task accuracy per round, the strategy's TPR/FPR beside them;
    a dashed line where the attack starts (the ASR before it is the clean model's tail error)."""
    fig, (ax_asr, ax_det) = _subplots(1, 2, figsize=(10, 4))
    for ax, keys in (
        (ax_asr, (("backdoor/asr", "backdoor ASR"), ("accuracy", "main-task accuracy"))),
        (ax_det, (("detection/tpr", "TPR (attackers flagged)"), ("detection/fpr", "FPR (honest flagged)"))),
    ):
        for key, label in keys:
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axvline(start_round - 0.5, color="grey", ls="--", lw=1, label="attack starts")
        ax.set(xlabel="round", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_asr.set(ylabel="share", title="backdoor and main task")
    ax_det.set(ylabel="rate", title="detection (scored against the ground truth)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
