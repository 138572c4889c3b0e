"""The robustness study's tables: scores under attack averaged over seeds, and datasets whose
undefended model did not learn marked as such (experiments/robustness_study.py)."""

from __future__ import annotations

import json

import pytest

from experiments import robustness_study as study
from experiments.study_runs import has_learned, num_classes

EPS = [2 / 255, 8 / 255]


def write_run(run_dir, *, accuracy, balanced, pgd_balanced, success):
    """A run folder as fedmed leaves it: metrics.jsonl (round 0 and the last round) and summary.json."""
    last = {"round": 3, "accuracy": accuracy, "balanced_accuracy": balanced, "auc": 0.8}
    last |= {"adv/none/0.0000/accuracy": accuracy, "adv/none/0.0000/balanced_accuracy": balanced}
    for attack in study.ATTACKS:
        for eps in EPS:
            key = f"adv/{attack}/{study.eps_key(eps)}"
            last |= {f"{key}/accuracy": accuracy / 2, f"{key}/balanced_accuracy": pgd_balanced}
            last |= {f"{key}/auc": None, f"{key}/success_rate": success}
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 0, "accuracy": 0.5}) + "\n" + json.dumps(last) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": 10.0}))


def runs_of(tmp_path, cells):
    runs = {}
    for (dataset, defense, seed), scores in cells.items():
        run_dir = tmp_path / "resnet18" / dataset / defense / f"seed{seed}"
        write_run(run_dir, **scores)
        runs.setdefault(("resnet18", dataset, defense), []).append({"seed": seed, **study.read_run(run_dir, EPS)})
    return runs


def test_tables_average_seeds_and_mark_a_baseline_that_did_not_learn(tmp_path):
    learned = dict(accuracy=0.8, pgd_balanced=0.3, success=0.5)
    majority = dict(accuracy=0.73, balanced=0.5, pgd_balanced=0.5, success=0.0)
    runs = runs_of(
        tmp_path,
        {
            ("pneumoniamnist", "none", 0): {**learned, "balanced": 0.70},
            ("pneumoniamnist", "none", 1): {**learned, "balanced": 0.80},
            # FGSM-AT at the majority class: high accuracy under attack, chance balanced accuracy
            ("pneumoniamnist", "fgsm_at", 0): majority,
            ("pneumoniamnist", "fgsm_at", 1): majority,
            ("breastmnist", "none", 0): majority,
            ("breastmnist", "fgsm_at", 0): {**learned, "balanced": 0.75},
        },
    )
    markdown, records = study.tables(runs, EPS, ["none", "fgsm_at"])
    clean = {tuple(cells[1:4]): cells for cells in (line.split(" | ") for line in markdown) if len(cells) > 8}
    # mean +- sd over the two seeds; the sd of one seed is left out
    assert clean["pneumoniamnist", "none", "2"][5:8] == ["0.800 ± 0.000", "0.750 ± 0.071", "0.800 ± 0.000"]
    assert clean["breastmnist", "none", "1"][5:8] == ["0.730", "0.500", "0.800"]
    assert clean["pneumoniamnist", "none", "2"][4] == "yes"
    assert clean["pneumoniamnist", "fgsm_at", "2"][4] == "**no**"
    # BreastMNIST's undefended model did not learn: both its rows say so, even the one that did
    assert clean["breastmnist", "none", "1"][4] == "**no**"
    assert clean["breastmnist", "fgsm_at", "1"][4] == "yes (baseline did not learn)"
    text = "\n".join(markdown)
    for short in study.SCORES.values():
        assert f"**{short}: " in text
    # one csv record per run and seed, every score under every attack
    assert len(records) == 1 + 6
    header = records[0]
    assert {"pgd@8/255", "pgd@8/255/balanced_accuracy", "pgd@8/255/auc", "pgd@8/255/success_rate"} <= set(header)
    row = dict(zip(header, records[1]))
    assert row["seed"] == 0 and row["pgd@8/255/success_rate"] == 0.5 and row["pgd@8/255/auc"] is None


@pytest.mark.parametrize(
    ("balanced", "auc", "classes", "expected"),
    [
        ([0.62], [0.8], 2, True),
        ([0.58], [0.9], 2, False),  # balanced accuracy too close to chance
        ([0.31], [0.75], 5, True),
        ([0.31], [0.57], 5, False),  # its scores do not rank the classes
        ([0.31], [None], 5, True),  # AUC undefined: judged on balanced accuracy alone
        ([0.9], [0.9], None, None),  # classes unknown
    ],
)
def test_learned_is_balanced_accuracy_above_chance_and_auc(balanced, auc, classes, expected):
    assert num_classes("retinamnist") == 5 and num_classes("breastmnist") == 2 and num_classes("folder") is None
    assert has_learned(balanced, auc, classes) is expected
