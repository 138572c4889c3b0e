"""Who holds what: the clients' label counts as a console table and a plot (``partition.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table


def label_count_table(labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Counts per client and class: an int64 array (num_partitions, num_classes)."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"found [{labels.min()}, {labels.max()}]"
        )
    counts = np.zeros((len(partitions), num_classes), dtype=np.int64)
    for client, indices in enumerate(partitions):
        counts[client] = np.bincount(labels[indices], minlength=num_classes)
    return counts


# Past this many clients the table and the plot summarise the clients instead of listing each:
# 1000 bars made a 251-inch-high figure, and 1000 rows scroll the console for nothing.
MAX_LISTED_CLIENTS = 50


def format_label_table(
    counts: np.ndarray, class_names: Sequence[str], client_names: Sequence[str] | None = None
) -> Table:
    """A rich table with one row per client (by index, or by ``client_names`` such as deployed
    sites' names): its count of each class and its total. Above ``MAX_LISTED_CLIENTS`` clients,
    rows of the minimum, median, mean and maximum over the clients instead."""
    _check_counts_match_names(counts, class_names)
    many = len(counts) > MAX_LISTED_CLIENTS
    title = f"Samples per client and class, over {len(counts)} clients" if many else "Samples per client and class"
    table = Table(title=title)
    table.add_column("clients" if many else "client", justify="right")
    for name in class_names:
        table.add_column(str(name), justify="right")
    table.add_column("total", justify="right", style="bold")
    if many:
        with_totals = np.column_stack([counts, counts.sum(axis=1)])
        for name, reduce in (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max)):
            table.add_row(name, *(f"{value:g}" for value in reduce(with_totals, axis=0)))
        return table
    client_names = client_names or [str(client) for client in range(len(counts))]
    for client, row in zip(client_names, counts):
        table.add_row(client, *(str(int(count)) for count in row), str(int(row.sum())))
    return table


def plot_label_counts(
    counts: np.ndarray, class_names: Sequence[str], path: str | Path, client_names: Sequence[str] | None = None
) -> Path:
    """Save a stacked horizontal bar chart (one bar per client, a colour per class) as PNG; above
    ``MAX_LISTED_CLIENTS`` clients, histograms over the clients instead (``_plot_label_summary``)."""
    _check_counts_match_names(counts, class_names)
    num_clients, num_classes = counts.shape
    # A Figure with an explicit Agg canvas, not pyplot: no global backend switch and no
    # shared pyplot state between threads or Ray workers.
    many = num_clients > MAX_LISTED_CLIENTS
    figure = Figure(figsize=(11, 4) if many else (8, max(3.0, 1.5 + 0.25 * num_clients)))
    FigureCanvasAgg(figure)
    colour_map = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    if many:
        _plot_label_summary(figure, counts, class_names, colour_map)
    else:
        _plot_label_bars(figure.add_subplot(), counts, class_names, client_names, colour_map)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path


def _plot_label_bars(axes, counts: np.ndarray, class_names: Sequence[str], client_names, colour_map) -> None:
    num_clients, num_classes = counts.shape
    clients = np.arange(num_clients)
    left = np.zeros(num_clients)
    for cls in range(num_classes):
        colour = colour_map(cls % colour_map.N)
        axes.barh(clients, counts[:, cls], left=left, color=colour, label=str(class_names[cls]))
        left += counts[:, cls]
    axes.set_yticks(clients, labels=client_names)
    axes.invert_yaxis()  # client 0 on top, as in the table
    axes.set_xlabel("samples")
    axes.set_ylabel("client")
    axes.set_title("Label distribution per client")
    axes.legend(title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")


def _plot_label_summary(figure: Figure, counts: np.ndarray, class_names: Sequence[str], colour_map) -> None:
    """Many clients: how many samples the clients hold, and what share of its samples each class
    is on a client (label skew spreads these shares towards 0 and 1)."""
    sizes_axes, shares_axes = figure.subplots(1, 2)
    totals = counts.sum(axis=1)
    sizes_axes.hist(totals, bins=min(50, max(1, int(totals.max() - totals.min()) + 1)), color="grey")
    sizes_axes.set(xlabel="samples", ylabel="clients", title=f"Samples per client ({len(counts)} clients)")
    shares = counts / np.maximum(totals, 1)[:, None]
    for cls, name in enumerate(class_names):
        colour = colour_map(cls % colour_map.N)
        shares_axes.hist(shares[:, cls], bins=20, range=(0, 1), histtype="step", color=colour, label=str(name))
    shares_axes.set(xlabel="share of the client's samples", ylabel="clients", title="Class share per client")
    shares_axes.legend(title="class", fontsize="small")


def _check_counts_match_names(counts: np.ndarray, class_names: Sequence[str]) -> None:
    if counts.ndim != 2 or counts.shape[1] != len(class_names):
        raise ValueError(
            f"counts must be (num_clients, num_classes) with one column per class name; "
            f"got shape {counts.shape} and {len(class_names)} class names"
        )
