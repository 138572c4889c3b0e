"""`fedmed-run`: start a deployed run with `flwr run` and, with ``--wait``, follow it to its end.

`flwr run` returns 0 as soon as the SuperLink has accepted the run, even if the run then fails.
``--wait`` follows the run's log on this console (`flwr log N <connection>`, whose stream the
SuperLink ends when the run finishes), then asks `flwr ls <connection> --run-id N --format json`
how it ended, and exits non-zero unless it completed and wrote its summary. One `flwr` process
waits on the stream: polling `flwr ls` instead started a process, 1.8 s of CPU, every few seconds.
Hydra overrides after the options go to the server app unchanged (`flwr run ... --run-config 'overrides="..."'`).

    fedmed-run --connection hospitals --wait dataset=pneumoniamnist federation.num_clients=2 \\
        output_dir=/srv/fedmed/runs/first
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

FINISHED = "finished"
COMPLETED = "finished:completed"


def run_overrides(overrides: list[str], output_dir: Path) -> str:
    """The ``overrides`` run-config value: the user's overrides with ``output_dir`` absolute."""
    kept = [o for o in overrides if not o.startswith("output_dir=")]
    text = " ".join([*kept, f"output_dir={output_dir}"])
    if '"' in text or "\\" in text:
        raise ValueError(f"overrides may not contain double quotes or backslashes: {text}")
    return text


def chosen_output_dir(overrides: list[str]) -> Path:
    """``output_dir=`` from the overrides made absolute here (the SuperLink writes there, so this
    command runs on the SuperLink's machine), else ``outputs/fedmed-run-<time>``."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")]
    path = Path(given[-1]) if given else Path("outputs") / f"fedmed-run-{time.strftime('%Y%m%d-%H%M%S')}"
    return path.expanduser().resolve()


def flwr_json(command: list[str], timeout: float) -> dict:
    """Run a `flwr` command with ``--format json``; its JSON reply, or an error naming it."""
    done = subprocess.run([*command, "--format", "json"], capture_output=True, text=True, timeout=timeout)
    start = done.stdout.find("{")
    try:
        reply = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if done.returncode != 0 or not reply.get("success", False):
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {done.returncode}): "
            f"{reply.get('error-message') or done.stderr.strip() or done.stdout.strip()}"
        )
    return reply


def _named(connection: str) -> list[str]:
    return [connection] if connection else []  # none: the default in $FLWR_HOME/config.toml


def start_run(app: str, connection: str, overrides: str, timeout: float) -> int:
    command = ["flwr", "run", app, *_named(connection), "--run-config", f'overrides="{overrides}"']
    return int(flwr_json(command, timeout)["run-id"])


def run_status(connection: str, run_id: int, timeout: float) -> str:
    reply = flwr_json(["flwr", "ls", *_named(connection), "--run-id", str(run_id)], timeout)
    (run,) = [r for r in reply["runs"] if int(r["run-id"]) == run_id]
    return str(run["status"])


def follow_log(connection: str, run_id: int, timeout: float) -> None:
    """The run's log on this console until the SuperLink ends the stream (the run finished) or
    the connection drops."""
    subprocess.run(["flwr", "log", str(run_id), *_named(connection)], timeout=timeout, check=False)


def wait_for_run(connection: str, run_id: int, timeout: float, poll: float) -> str:
    """The run's final status (``finished:...``), or ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            follow_log(connection, run_id, timeout=max(deadline - time.monotonic(), 1.0))
        status = run_status(connection, run_id, timeout=60)
        if status.startswith(FINISHED):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"run {run_id} still {status} after {timeout:.0f} s (--timeout); "
                f"it goes on: follow it with `flwr ls {connection} --run-id {run_id}`"
            )
        time.sleep(poll)  # the stream ended early: the connection dropped


def outcome(status: str, output_dir: Path, log_command: str) -> tuple[int, str]:
    """Exit code and message: 0 only when Flower says completed and the summary is there."""
    summary_path = output_dir / "summary.json"
    if status != COMPLETED:
        return 1, f"the run ended {status}; its log: `{log_command}`"
    if not summary_path.exists():
        return 1, f"the run completed but wrote no {summary_path}"
    summary = json.loads(summary_path.read_text())
    state = summary.get("status", "completed")
    final = summary.get("final", {}).get("accuracy")
    if state not in ("completed", "degraded"):
        return 1, f"the run ended {state} (summary.json)"
    return 0, f"the run {state}; final accuracy {final}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedmed-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the server app, e.g. dataset=pneumoniamnist")
    parser.add_argument(
        "--connection",
        default="",
        help="SuperLink connection in $FLWR_HOME/config.toml (default: its [superlink] default)",
    )
    parser.add_argument("--app", default=".", help="the fedmed project folder to package (default: .)")
    parser.add_argument("--wait", action="store_true", help="follow the run and exit non-zero unless it completed")
    parser.add_argument("--timeout", type=float, default=24 * 3600.0, help="longest wait with --wait, seconds")
    parser.add_argument(
        "--poll",
        type=float,
        default=5.0,
        help="with --wait, seconds before following the log again if its stream drops",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = chosen_output_dir(args.overrides)
    try:
        run_id = start_run(args.app, args.connection, run_overrides(args.overrides, output_dir), timeout=600)
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        print(f"fedmed-run: {error}", file=sys.stderr)
        return 2
    print(f"fedmed-run: started run {run_id}; outputs go to {output_dir} (on the SuperLink's machine)", flush=True)
    if not args.wait:
        return 0
    try:
        status = wait_for_run(args.connection, run_id, args.timeout, args.poll)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as error:
        print(f"fedmed-run: {error}", file=sys.stderr)
        return 1
    log_command = " ".join(["flwr", "log", str(run_id), *_named(args.connection), "--show"])
    code, message = outcome(status, output_dir, log_command)
    print(f"fedmed-run: run {run_id}: {message}; outputs in {output_dir}", file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
