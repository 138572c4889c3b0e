"""`fedmed-run`: a failed run exits non-zero although `flwr run` returned 0 (a stand-in `flwr`
on PATH plays the SuperLink's answers; tests/test_deployment.py runs the real one)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from fedmed.deploy_run import main, run_overrides

FAKE_FLWR = """#!{python}
import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[0] == "run":
    print(json.dumps({{"success": True, "run-id": 42}}))
elif args[0] == "ls":
    asked = sum(1 for line in open({calls!r}) if json.loads(line)[0] == "ls")
    status = {status!r} if asked > {running_for} else "running"
    print(json.dumps({{"success": True, "runs": [{{"run-id": "42", "status": status}}]}}))
"""


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    def install(status: str, running_for: int = 0) -> Path:
        """`flwr ls` answers "running" its first ``running_for`` times, then ``status``."""
        calls = tmp_path / "calls.jsonl"
        script = tmp_path / "bin" / "flwr"
        script.parent.mkdir(exist_ok=True)
        script.write_text(
            FAKE_FLWR.format(python=sys.executable, calls=str(calls), status=status, running_for=running_for)
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
        return calls

    return install


def test_a_failed_run_exits_non_zero(fake_flwr, tmp_path, capsys):
    calls = fake_flwr("finished:failed")
    code = main(
        [
            "--connection",
            "hospitals",
            "--wait",
            "--poll",
            "0",
            "dataset=pneumoniamnist",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    assert code == 1
    assert "finished:failed" in capsys.readouterr().err
    run, log, ls = [json.loads(line) for line in calls.read_text().splitlines()]
    assert run[:3] == ["run", ".", "hospitals"]
    assert log == ["log", "42", "hospitals"]  # followed once, not polled
    assert run[run.index("--run-config") + 1] == f'overrides="dataset=pneumoniamnist output_dir={tmp_path / "out"}"'
    assert ls[:4] == ["ls", "hospitals", "--run-id", "42"]


def test_a_completed_run_exits_zero_and_says_where_its_outputs_are(fake_flwr, tmp_path, capsys):
    fake_flwr("finished:completed")
    out = tmp_path / "out"
    assert main(["--wait", "--poll", "0", f"output_dir={out}"]) == 1  # completed, but no summary
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"status": "degraded", "final": {"accuracy": 0.75}}))
    assert main(["--wait", "--poll", "0", f"output_dir={out}"]) == 0
    assert f"the run degraded; final accuracy 0.75; outputs in {out}" in capsys.readouterr().out


def test_relative_output_dir_is_made_absolute_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        run_overrides(["seed=1", "output_dir=runs/a"], Path("runs/a").resolve())
        == f"seed=1 output_dir={tmp_path / 'runs' / 'a'}"
    )
    with pytest.raises(ValueError, match="double quotes"):
        run_overrides(['dataset.root="x"'], tmp_path)


def test_the_app_package_holds_the_configs_and_no_tests():
    """What `flwr run .` sends: the app's code, its yaml configs and checksums, not tests/."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(Path(__file__).parents[1]))).namelist())
    assert {
        "configs/config.yaml",
        "configs/partition/iid.yaml",
        "configs/__init__.py",
        "fedmed/datasets/medmnist.py",
        "strategies/aggregators/fedavg.py",
        "fedmed/medmnist_md5.json",
        "clients/client_app.py",
        "strategies/server_app.py",
    } <= names
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "outputs/"))]


def test_a_log_stream_that_drops_before_the_end_is_followed_again(fake_flwr, tmp_path, capsys):
    calls = fake_flwr("finished:failed", running_for=1)
    assert main(["--wait", "--poll", "0", f"output_dir={tmp_path / 'out'}"]) == 1
    assert [json.loads(line)[0] for line in calls.read_text().splitlines()] == ["run", "log", "ls", "log", "ls"]
