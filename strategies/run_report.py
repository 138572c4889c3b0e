"""The end of a run: the plots and ``summary.json`` from the rounds' rows."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fedmed.detection import RoundDetection, run_totals
from fedmed.poisoning import AttackConfig, MaliciousClientsConfig
from fedmed.report import (
    plot_backdoor_per_round,
    plot_robustness_per_round,
    plot_robustness_vs_eps,
    plot_rounds,
    print_summary,
    write_summary,
)


def run_title(cfg: DictConfig) -> str:
    return (
        f"{cfg.model.name} on {cfg.dataset.name}, {cfg.federation.num_clients} clients "
        f"({cfg.partition.name} partition), {cfg.strategy.name}"
    )


def run_status(rows: list[dict]) -> dict:
    """``degraded`` when a client was lost during the run (the rounds went on without it)."""
    lost = sorted({str(f["client"]) for row in rows for f in row.get("failures", []) if f.get("kind") == "lost"})
    return {"status": "degraded" if lost else "completed", "lost_clients": lost}


def backdoor_summary(rows: list[dict], start_round: int) -> dict:
    """ASR just before the attack (the clean model's error on tail inputs), at the end, and its
    maximum over the attacked rounds: the rise over the first is what shows the backdoor."""
    asr = {row["round"]: row.get("backdoor/asr") for row in rows}
    attacked = [v for r, v in asr.items() if r >= start_round and v is not None]
    return {
        "asr_before_attack": asr.get(start_round - 1),
        "asr_final": rows[-1].get("backdoor/asr") if rows else None,
        "asr_max": max(attacked) if attacked else None,
    }


def report_run(
    cfg: DictConfig,
    output_dir: Path,
    rows: list[dict],
    *,
    attack: AttackConfig,
    malicious: list[int],
    detections: list[RoundDetection],
    started: float,
    console: Console | None = None,
) -> dict:
    """Writes the plots and ``summary.json``; prints the summary table to ``console`` if given.
    Returns the summary."""
    plots_dir = output_dir / "plots"
    title = run_title(cfg)
    plot_rounds(rows, plots_dir / "accuracy.png", title)
    if any(key.startswith("adv/") for row in rows for key in row):
        plot_robustness_per_round(rows, plots_dir / "robustness_per_round.png", title)
        plot_robustness_vs_eps(rows, plots_dir / "robustness_vs_eps.png", title)
    extra = {
        "rejected_replies": sum(len(row.get("rejected", [])) for row in rows),
        "failed_clients": sum(len(row.get("failures", [])) for row in rows),
        **run_status(rows),
    }
    if isinstance(attack, MaliciousClientsConfig):
        plot_backdoor_per_round(rows, plots_dir / "asr.png", f"{title}, attack={attack.name}", int(attack.start_round))
        extra["attack"] = {
            "name": attack.name,
            "malicious_partitions": malicious,
            **backdoor_summary(rows, int(attack.start_round)),
        }
    extra["detection"] = {"strategy": str(cfg.strategy.name), **run_totals(detections)}
    extra["config"] = OmegaConf.to_container(cfg, resolve=True)
    summary = write_summary(output_dir / "summary.json", rows, time.monotonic() - started, extra)
    if console is not None:
        print_summary(rows, title, console)
    return summary
