"""`fedmed-sim`: compose the Hydra configuration and run the federation in Flower's simulation
engine on Ray (one virtual SuperNode per client)."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import configs
from fedmed.logs import LOGGER_NAME
from fedmed.stopping import RunInterrupted, StopControl, exit_leaving_stuck_threads

# every registry's options, strategies' included: configs/ is the application's configuration
configs.register()


def backend_config(ray_cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: resources per virtual client and `ray.init` arguments."""
    # logging_level and log_to_driver: Flower's defaults, set here as fedmed starts Ray itself
    init_args: dict = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if ray_cfg.address:
        init_args["address"] = str(ray_cfg.address)
    else:
        # a Ray instance of its own: without an address `ray.init` joins whatever cluster
        # `ray start` left running on this machine (even one whose head has gone away)
        init_args["address"] = "local"
        if ray_cfg.num_cpus:
            init_args["num_cpus"] = int(ray_cfg.num_cpus)
    return {
        "client_resources": {
            "num_cpus": float(ray_cfg.num_cpus_per_client),
            "num_gpus": float(ray_cfg.num_gpus_per_client),
        },
        "init_args": init_args,
    }


MODEL_TRANSPORTS = ("auto", "shared_memory", "message")


def uses_shared_arrays(ray_cfg: DictConfig) -> bool:
    """Whether models travel as files in shared memory (``fedmed.shared_arrays``): ``auto`` does
    so when Ray runs on this machine, where every client can read the server's files."""
    transport = str(ray_cfg.model_transport)
    if transport not in MODEL_TRANSPORTS:
        raise ValueError(f"ray.model_transport={transport!r}: choose one of {', '.join(MODEL_TRANSPORTS)}")
    if transport == "auto":
        return not ray_cfg.address
    return transport == "shared_memory"


def check_config(cfg: DictConfig) -> None:
    """Refuse settings that cannot work before any process starts."""
    fed = cfg.federation
    if fed.num_clients < 1 or fed.rounds < 0:
        raise ValueError(f"federation.num_clients={fed.num_clients} must be >= 1 and federation.rounds >= 0")
    if not 1 <= fed.clients_per_round <= fed.num_clients:
        raise ValueError(
            f"federation.clients_per_round={fed.clients_per_round} must be between 1 and "
            f"federation.num_clients={fed.num_clients}"
        )
    from fedmed.config import check_client, check_eval
    from fedmed.poisoning import check_attack

    check_client(cfg.client, str(cfg.device))
    check_eval(cfg.eval)
    check_attack(cfg.attack, num_clients=int(fed.num_clients))
    if cfg.ray.num_gpus_per_client > 0 and cfg.device == "cpu":
        raise ValueError("ray.num_gpus_per_client > 0 with device=cpu: use device=auto or cuda")
    uses_shared_arrays(cfg.ray)
    from clients.faults import check_faults

    check_faults(OmegaConf.to_object(cfg.fault), int(fed.num_clients))
    if not 1 <= fed.min_replies <= fed.clients_per_round:
        raise ValueError(
            f"federation.min_replies={fed.min_replies} must be between 1 and "
            f"federation.clients_per_round={fed.clients_per_round}"
        )
    if cfg.checkpoint.every < 1:
        raise ValueError(f"checkpoint.every={cfg.checkpoint.every} must be >= 1")


def run(cfg: DictConfig, output_dir: Path, resume: bool = False) -> dict:
    """Run one federation described by ``cfg``; outputs go to ``output_dir``. Returns the summary.

    ``resume``: continue the run in ``output_dir`` from its checkpoint (``cfg`` is its config).
    Raises ``RunInterrupted`` after a SIGINT/SIGTERM and ``NotEnoughReplies`` when a round gets
    fewer valid replies than ``federation.min_replies``; both leave a checkpoint and a summary
    marked ``interrupted``.
    """
    import json

    from fedmed.checkpoint import CHECKPOINT_FILE, CheckpointKeeper, read_checkpoint
    from fedmed.data import dataset_from_config
    from fedmed.ray_start import RayStart
    from strategies.preflight import prepare_config, simulated_partitions

    # before the imports below: alembic logs its plugins at INFO as Flower's simulation loads it
    for chatty in ("opacus", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    check_config(cfg)
    prepare_config(cfg)
    resume_from = read_checkpoint(output_dir / CHECKPOINT_FILE) if resume else None
    # Load (and verify) the data here, before Ray starts: a missing or corrupt file fails at
    # once with its own message, and the server's copy is then cached in this process.
    dataset = dataset_from_config(OmegaConf.to_container(cfg.dataset, resolve=True), int(cfg.seed))
    backend = backend_config(cfg.ray)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray_start = RayStart(backend["init_args"])  # while the rest is imported (fedmed.ray_start)
    quieted = {name: logging.getLogger(name).level for name in ("flwr", LOGGER_NAME)}
    try:
        # The split too, while Ray starts: one that cannot be made (say dirichlet's
        # min_partition_size times 1000 clients) fails here, naming its keys, and the server
        # then finds it cut.
        simulated_partitions(cfg, dataset)
        from clients.client_app import app as client_app
        from fedmed.simulation import simulate
        from strategies.server_app import make_server_app

        output_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            (output_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        summary_path = output_dir / "summary.json"
        summary_path.unlink(missing_ok=True)
        if cfg.progress:  # the round lines say it; warnings still show
            for name in quieted:
                logging.getLogger(name).setLevel(logging.WARNING)
        else:  # log lines instead, without Flower's DEBUG records (run ids, object stores)
            logging.getLogger("flwr").setLevel(logging.INFO)
        keeper = CheckpointKeeper(output_dir / CHECKPOINT_FILE, int(cfg.checkpoint.every))
        server_app = make_server_app(
            cfg, output_dir, uses_shared_arrays(cfg.ray), resume_from, stop := StopControl(), keeper
        )
        ray_start.wait()
        run_stoppable(
            functools.partial(simulate, server_app, client_app, int(cfg.federation.num_clients), backend),
            stop,
            keeper,
            output_dir,
        )
    finally:
        ray_start.shutdown()
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
    if not summary_path.exists():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


def run_stoppable(simulate: Callable[[], None], stop: StopControl, keeper, output_dir: Path) -> None:
    """``simulate()`` with SIGINT/SIGTERM taken over (``fedmed.stopping``; main thread only). On
    the first signal: the last complete round is checkpointed, Ray shut down, this run's shared
    memory removed and summary.json marked interrupted, then ``RunInterrupted`` is raised."""
    import ray

    from fedmed.checkpoint import stopped_summary
    from fedmed.shared_arrays import remove_own_directories

    started = time.monotonic()
    flower_log_level = logging.getLogger("flwr").level  # release_client_actors silences it
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        stop.install()
    try:
        simulate()
    except (RunInterrupted, SystemExit) as interruption:
        # a ray.init in the main thread answers SIGTERM with sys.exit(SIGTERM) (fedmed.stopping)
        if isinstance(interruption, SystemExit) and interruption.code != signal.SIGTERM:
            raise
        stop.requested.set()
        reason = str(interruption) if isinstance(interruption, RunInterrupted) else "SIGTERM"
        keeper.close()
        if ray.is_initialized():
            ray.shutdown()
        remove_own_directories()
        stopped_summary(output_dir, keeper, f"stopped by {reason}", time.monotonic() - started)
        raise RunInterrupted(reason) from None
    finally:
        if ray.is_initialized():
            ray.shutdown()
        remove_own_directories()
        logging.getLogger("flwr").setLevel(flower_log_level)
        if in_main_thread:
            stop.restore()


EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def resume_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from fedmed.checkpoint import resumed_config
    from strategies.rounds import NotEnoughReplies

    if cfg.resume:
        output_dir = Path(cfg.resume)
        cfg = resumed_config(output_dir, cfg, resume_overrides())
    else:
        output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, output_dir, resume=bool(cfg.resume))
    except (RunInterrupted, NotEnoughReplies) as stopped:
        hint = (
            json.loads((output_dir / "summary.json").read_text()).get("resume")
            if (output_dir / "summary.json").exists()
            else None
        )
        print(
            f"fedmed: run stopped ({stopped}); "
            + (f"continue it with: {hint}" if hint else "no round was complete, nothing to resume"),
            file=sys.stderr,
            flush=True,
        )
        exit_leaving_stuck_threads(EXIT_CODES.get(str(stopped), 3), grace_s=0.0)
    print(f"outputs in {output_dir.resolve()} (final accuracy {summary['final'].get('accuracy')})", flush=True)


def main() -> None:
    # A resumed run writes into its own folder, and Hydra's record of this invocation would
    # overwrite nothing useful there: point Hydra at it and keep its .hydra/ out.
    resume = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("resume=")), None)
    if resume:
        sys.argv += [f"hydra.run.dir={resume}", "hydra.output_subdir=null"]
    hydra_main()
    # after every run of a sweep (`-m`), not after the first
    exit_leaving_stuck_threads(0)


if __name__ == "__main__":
    sys.exit(main())
