"""What a run leaves behind: metrics.jsonl, summary.json, plots and the console summary table."""

from __future__ import annotations

import json
import math
import platform
import sys
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

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


class MetricsLog:
    """Appends one JSON object per round to ``metrics.jsonl`` and keeps the rows in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        path.write_text("")

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


def write_summary(path: Path, rows: list[dict], wall_time_s: float, extra: dict) -> dict:
    final = rows[-1] if rows else {}
    scored = [r for r in rows if r.get("accuracy") is not None]
    summary = {
        "final": {k: v for k, v in final.items() if k not in ("clients", "rejected", "client_eval")},
        "best_accuracy": max((r["accuracy"] for r in scored), default=None),
        "rounds": final.get("round", 0),
        "wall_time_s": wall_time_s,
        "command": " ".join(sys.argv),
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
    parts.append(f"{row['time_s']:.1f} s")
    if seconds_left is not None:
        parts.append(f"~{seconds_left:.0f} s left")
    return " | ".join(parts)


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    table.add_column("round", justify="right")
    for key in (*MAIN_KEYS, "train_loss", "time_s"):
        table.add_column(key, justify="right")
    step = max(1, math.ceil(len(rows) / 25))
    shown = rows[::step] if rows[-1:] == rows[::step][-1:] else rows[::step] + rows[-1:]
    for row in shown:
        table.add_row(str(row["round"]), *(_fmt(row.get(k)) for k in (*MAIN_KEYS, "train_loss", "time_s")))
    return table


def print_summary(rows: list[dict], title: str, console: Console | None = None) -> None:
    if rows:
        (console or Console()).print(summary_table(rows, title))


def plot_rounds(rows: list[dict], path: Path, title: str) -> Path:
    """Accuracy, balanced accuracy and AUC of the global model per round, loss beside them."""
    rounds = [r["round"] for r in rows]
    fig, (ax_score, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
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
    plt.close(fig)
    return path
