"""`fedmed-sim`: compose the Hydra configuration and run the federation in Flower's simulation
engine on Ray (one virtual SuperNode per client)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedmed.config import register_configs

register_configs()


def backend_config(ray_cfg: DictConfig) -> dict:
    """Flower's Ray backend settings: resources per virtual client and `ray.init` arguments."""
    init_args: dict = {"include_dashboard": False}
    if ray_cfg.address:
        init_args["address"] = str(ray_cfg.address)
    elif ray_cfg.num_cpus:
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


def run(cfg: DictConfig, output_dir: Path) -> dict:
    """Run one federation described by ``cfg``; outputs go to ``output_dir``. Returns the summary."""
    import json

    from clients.client_app import app as client_app
    from fedmed.data import dataset_from_config
    from fedmed.simulation import simulate
    from strategies.server_app import make_server_app, prepare_config

    check_config(cfg)
    prepare_config(cfg)
    # Load (and verify) the data here, before Ray starts: a missing or corrupt file fails at
    # once with its own message, and the server's copy is then cached in this process.
    dataset_from_config(OmegaConf.to_container(cfg.dataset, resolve=True), int(cfg.seed))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summary_path = output_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for chatty in ("opacus", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if cfg.progress:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    simulate(make_server_app(cfg, output_dir, share_arrays=uses_shared_arrays(cfg.ray)), client_app,
             int(cfg.federation.num_clients), backend_config(cfg.ray))
    if not summary_path.exists():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    summary = run(cfg, output_dir)
    print(f"outputs in {output_dir.resolve()} (final accuracy {summary['final'].get('accuracy')})")


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
