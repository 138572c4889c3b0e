"""Checkpoints, `fedmed-sim resume=<run folder>`, and stopping a run with SIGINT/SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedmed.checkpoint import KILL_AFTER_ENV, read_checkpoint, resumed_config
from tests.helpers import compose_config
from tests.test_end_to_end import without_timings

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "federation.num_clients=3",
    "federation.clients_per_round=2",
    "federation.rounds=2",
    "eval.max_samples=32",
    "eval.eps=[0.0314]",
    "eval.attacks=[fgsm]",
    "dataset.n_train=300",
    "dataset.n_val=100",
    "dataset.n_test=200",
    "progress=false",
]


def hydra_dir(output_dir):
    """Hydra's own run folder (its log) inside the test's, not under the repository's outputs/."""
    return f"hydra.run.dir={output_dir}"


def fedmed(*args, env=None, timeout=900):
    """`python -m fedmed args` in a subprocess; returns (returncode, output)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmed", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return process.returncode, output


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


RESUMED_SETUPS = {
    # FoolsGold's history, DP-SGD's accountants and an attack that starts in round 2 all carry
    # from round 1 into round 2; two of three clients sampled a round (the sampling generator)
    "foolsgold-dp_sgd-attack": [
        "strategy=foolsgold",
        "defense=dp_sgd",
        "attack=label_flip",
        "attack.ids=[2]",
        "attack.start_round=2",
    ],
    "flame": ["strategy=flame", "federation.clients_per_round=3"],  # FLAME's noise
    "fedavg": ["strategy=fedavg", "federation.fraction_evaluate=0.5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(RESUMED_SETUPS))
def test_killed_and_resumed_run_equals_uninterrupted_one(tmp_path, setup, on_cluster):
    # on the test run's Ray cluster: the killed driver's actors must go with it, or the resumed
    # run would wait for their CPUs
    overrides = [*TINY, *RESUMED_SETUPS[setup], *on_cluster]
    code, output = fedmed(*overrides, f"output_dir={tmp_path / 'whole'}", hydra_dir(tmp_path / "whole"))
    assert code == 0, output[-3000:]
    killed = tmp_path / "killed"
    code, output = fedmed(*overrides, f"output_dir={killed}", hydra_dir(killed), env={KILL_AFTER_ENV: "1"})
    assert code == -signal.SIGKILL, output[-3000:]  # really killed, right after round 1's checkpoint
    assert read_checkpoint(killed / "checkpoint.pt")["round"] == 1
    assert not (killed / "summary.json").exists()
    code, output = fedmed(f"resume={killed}", "progress=true")
    assert code == 0, output[-3000:]
    assert "resuming" in output and "after round 1 of 2" in output
    whole, resumed = metrics(tmp_path / "whole"), metrics(killed)
    assert [r["round"] for r in resumed] == [0, 1, 2]
    assert without_timings(resumed) == without_timings(whole)
    if setup.startswith("foolsgold"):
        assert resumed[2]["privacy/epsilon"] > resumed[1]["privacy/epsilon"]  # the accountants went on
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2


def test_checkpoint_keeps_every_array_exactly(tmp_path):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedmed.checkpoint import arrays_to_tensors, tensors_to_arrays, write_checkpoint

    arrays = ArrayRecord(
        {
            "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "counter": Array(np.array(7, dtype=np.int64)),
            "f": Array(np.array(2.5)),
        }
    )
    write_checkpoint(tmp_path / "c.pt", {"arrays": arrays_to_tensors(arrays)})
    back = tensors_to_arrays(read_checkpoint(tmp_path / "c.pt")["arrays"])
    for key, array in arrays.items():  # shapes (a 0-d counter stays 0-d), dtypes and values
        assert (back[key].shape, back[key].dtype) == (array.shape, array.dtype), key
        assert np.array_equal(back[key].numpy(), array.numpy()), key


def write_run_folder(folder, *overrides):
    folder.mkdir()
    cfg = compose_config(*overrides, f"output_dir={folder}")
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return cfg


def test_resume_refuses_overrides_that_change_the_experiment(tmp_path):
    write_run_folder(tmp_path / "run", "federation.rounds=3", "seed=4")
    asked = compose_config("seed=5", f"resume={tmp_path / 'run'}")
    with pytest.raises(ValueError, match=r"`seed=5` would change the experiment \(the run has seed=4\)"):
        resumed_config(tmp_path / "run", asked, ["seed=5", f"resume={tmp_path / 'run'}"])
    # the same value as the run's, and harmless keys, are accepted; the rest comes from config.yaml
    asked = compose_config("seed=4", "progress=false", "federation.round_timeout_s=60")
    cfg = resumed_config(tmp_path / "run", asked, ["seed=4", "progress=false", "federation.round_timeout_s=60"])
    assert (cfg.seed, cfg.federation.rounds, cfg.progress, cfg.federation.round_timeout_s) == (4, 3, False, 60)
    assert cfg.output_dir == str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no config.yaml there"):
        resumed_config(tmp_path / "nothing", asked, [])


def own_shared_directories(pid):
    return [p for parent in (Path("/dev/shm"), Path("/tmp")) for p in parent.glob(f"fedmed-arrays-{pid}-*")]


STOP_WITHIN_S = 15


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_within_seconds(tmp_path, signum):
    """A real signal to a real `python -m fedmed` during round 2 of 3, whose clients all hang
    (so the round under way cannot end by itself, however fast the machine): it exits within
    seconds, non-zero, with one line saying how to resume; the checkpoint holds round 1;
    summary.json is marked interrupted; Ray and the run's shared-memory files are gone."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedmed",
            *TINY,
            "federation.rounds=3",
            "dataset.n_train=900",
            "fault=[{kind:hang,partitions:[0,1,2],start_round:2}]",
            f"output_dir={tmp_path}",
            hydra_dir(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and process.poll() is None:
            if (
                (tmp_path / "metrics.jsonl").exists()
                and len(metrics(tmp_path)) >= 2
                and read_checkpoint(tmp_path / "checkpoint.pt")["round"] == 1
            ):
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(2)  # into round 2, its clients hanging
        assert own_shared_directories(process.pid)
        signalled = time.monotonic()
        process.send_signal(signum)
        output, _ = process.communicate(timeout=60)
        stopped_in = time.monotonic() - signalled
    finally:
        process.kill()
    assert process.returncode == 128 + signum, output[-3000:]
    # "within a few seconds": Ray's shutdown alone takes 3-5 s on a 2-core machine
    assert stopped_in < STOP_WITHIN_S, stopped_in
    assert f"continue it with: fedmed-sim resume={tmp_path.resolve()}" in output.strip().splitlines()[-1]
    assert "Traceback" not in output
    assert "FutureWarning" not in output and "DeprecationWarning" not in output, output[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] == 1
    assert summary["stop_reason"] == f"stopped by {signal.Signals(signum).name}"
    assert read_checkpoint(tmp_path / "checkpoint.pt")["round"] == 1
    assert not own_shared_directories(process.pid)
