"""The command line as a user meets it: a Hydra sweep (`fedmed-sim -m`, as in the README) runs
every job, not only the first, and the console carries no library noise.

`fedmed-sim` ends its process itself once a run's outputs are written (to skip the interpreter's
teardown, and to leave threads stuck on a hung client behind); done inside the job, that ended
a sweep after its first run with exit status 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = (
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "federation.rounds=1",
    "dataset.n_train=200",
    "dataset.n_test=50",
    "eval.attacks=[]",
    "progress=false",
    "federation.round_timeout_s=300",
    "federation.connect_timeout_s=300",
)


def test_a_sweep_runs_every_job_with_a_quiet_console(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [sys.executable, "-m", "fedmed", "-m", "seed=3,4", *TINY, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {
        job: json.loads((sweep_dir / job / "summary.json").read_text())
        for job in ("0", "1")
        if (sweep_dir / job / "summary.json").exists()
    }
    assert sorted(summaries) == ["0", "1"], f"jobs with a summary: {sorted(summaries)}\n{done.stdout[-2000:]}"
    assert [summaries[job]["config"]["seed"] for job in ("0", "1")] == [3, 4]
    console = done.stdout + done.stderr
    # alembic (loaded by Flower's simulation) logs its plugins at INFO; Flower deprecates run_simulation
    assert "alembic" not in console and "deprecated" not in console, console[:2000]
    # progress=false gives log lines, not Flower's internals (run ids, object stores) at DEBUG
    assert "[DEBUG]" not in console, console[:2000]
