"""What the study scripts share: running one fedmed federation per grid cell, resumably.

Each run is a `python -m fedmed` subprocess writing into its own folder. A run whose summary.json
says it finished is skipped and one stopped part-way is continued from its checkpoint, so an
interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def hydra_value(value) -> str:
    """A Python value as a Hydra override's right-hand side."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def overrides(settings: dict) -> list[str]:
    """Hydra overrides of ``settings``; a ``defense.<key>`` the run's defence (its ``defense``
    setting, default none) does not have is left out: a study sets its training epsilon once for
    every row, and ``defense=none`` has no epsilon."""
    from fedmed.defenses import defense_section

    keys = set(defense_section(str(settings.get("defense", "none"))))
    return [
        f"{k}={hydra_value(v)}"
        for k, v in settings.items()
        if not k.startswith("defense.") or k.split(".", 1)[1] in keys
    ]


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no stderr)"


def fmt(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def mean_sd(values: list) -> tuple[float | None, float | None]:
    """Mean and sample sd of the values that are not None (sd None for fewer than two)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


# A model has learned when its clean balanced accuracy is at least LEARNED_MARGIN above chance
# (1 / classes) and its AUC at least LEARNED_AUC (means over seeds): a model that answers the
# majority class for most images can keep the first above chance with a few lucky answers, but its
# scores do not rank the classes. A study's rows on a dataset whose undefended model has not
# learned say nothing about robustness: they attack a near-constant classifier.
LEARNED_MARGIN = 0.10
LEARNED_AUC = 0.70


def num_classes(dataset: str) -> int | None:
    """The number of classes of a MedMNIST dataset (fedmed's table), None for any other."""
    from fedmed.medmnist import DATASETS

    info = DATASETS.get(dataset)
    return len(info.class_names) if info is not None else None


def has_learned(balanced_accuracies: list, aucs: list, classes: int | None) -> bool | None:
    """Whether the mean balanced accuracy and the mean AUC clear the bars above; None when unknown
    (no balanced accuracy, or an unknown number of classes). A missing AUC is not held against it."""
    balanced, _ = mean_sd(balanced_accuracies)
    auc, _ = mean_sd(aucs)
    if balanced is None or not classes:
        return None
    return balanced >= 1.0 / classes + LEARNED_MARGIN and (auc is None or auc >= LEARNED_AUC)


def learned_mark(own: bool | None, baseline: bool | None) -> str:
    """A table cell: whether this row's model learned, and whether its baseline did."""
    text = {True: "yes", False: "**no**", None: "?"}[own]
    return text + (" (baseline did not learn)" if baseline is False else "")


def cell(values: list) -> str:
    """mean +- sd over seeds, 3 decimals (the sd left out for one seed; empty for none)."""
    mean, sd = mean_sd(values)
    if mean is None:
        return ""
    return fmt(mean) + ("" if sd is None else f" ± {fmt(sd)}")


FINISHED = ("completed", "degraded")  # summary.json statuses of a run that reached its last round


def run_status(run_dir: Path) -> str | None:
    """The run's summary.json status (None: no readable summary)."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def run_once(run_dir: Path, args: list[str], tag: str) -> str | None:
    """Run `python -m fedmed *args` into ``run_dir`` unless it has finished before.

    A run stopped part-way (SIGINT/SIGTERM: summary.json says ``interrupted`` and a checkpoint is
    there) is continued with fedmed's own ``resume=``; a run that left no checkpoint starts
    again. Returns a status ("skipped ...", "<wall> s") or None when the run failed (its command
    and the end of its stderr are printed).
    """
    status = run_status(run_dir)
    if status in FINISHED:
        return f"skipped ({status} before)"
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = status == "interrupted" and (run_dir / "checkpoint.pt").exists()
    if resuming:
        cmd = [sys.executable, "-m", "fedmed", f"resume={run_dir}"]
    else:
        cmd = [sys.executable, "-m", "fedmed", *args, f"output_dir={run_dir}", f"hydra.run.dir={run_dir}"]
    started = time.monotonic()
    mode = "a" if resuming else "w"
    with (run_dir / "stdout.log").open(mode) as so, (run_dir / "stderr.log").open(mode) as se:
        proc = subprocess.run(cmd, cwd=REPO, stdout=so, stderr=se)
    wall = time.monotonic() - started
    if proc.returncode != 0 or run_status(run_dir) not in FINISHED:
        print(
            f"{tag}: FAILED (exit {proc.returncode}, {wall:.0f} s)\n  command: "
            + shlex.join(cmd)
            + f"\n  last 30 lines of {run_dir / 'stderr.log'}:\n"
            + tail(run_dir / "stderr.log"),
            flush=True,
        )
        return None
    return f"{wall:.0f} s" + (" (resumed)" if resuming else "")


def study_parser(doc: str, configs: list[str], default_out: str) -> argparse.ArgumentParser:
    """The options every study takes: --config, --root, --out, --seed and --set."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(configs), default="quick")
    parser.add_argument(
        "--root", default=str(REPO.parent / "shared" / "data" / "medmnist"), help="folder with the MedMNIST .npz files"
    )
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="extra Hydra overrides for every run, after the configuration's",
    )
    return parser


def report(
    out: Path, title: str, markdown: list[str], note: str, figure: Path | None, failed: list[tuple], seconds: float
) -> int:
    """Write table.md, print it with what was written; exit status 1 if any run failed."""
    (out / "table.md").write_text(f"{title}\n\n" + "\n".join(markdown) + f"\n\n{note}\n")
    written = [out / "table.md", out / "table.csv", *([figure] if figure else [])]
    print(f"\n{title}\n")
    print("\n".join(markdown))
    print(f"\n{note}\n\ntotal {seconds:.0f} s; written: " + ", ".join(map(str, written)))
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join("/".join(k) for k in failed), file=sys.stderr)
        return 1
    return 0
