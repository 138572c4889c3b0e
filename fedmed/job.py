"""The part of the configuration that travels to clients with every message.

The server sends it as JSON in the message's ConfigRecord, so that simulated clients and real
SuperNodes at hospitals are configured the same way, by the run they take part in.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

JOB_KEY = "fedmed-job"
# set in an evaluate message's config on rounds where clients also assess robustness
ASSESS_KEY = "assess-robustness"
CLIENT_SECTIONS = ("dataset", "partition", "model", "client", "defense", "assimilation", "attack", "eval")


def job_from_config(cfg: DictConfig) -> dict:
    """Plain dict of what a client needs: data, model, local training, seed and device."""
    job = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in CLIENT_SECTIONS}
    job["seed"] = int(cfg.seed)
    job["device"] = str(cfg.device)
    job["num_clients"] = int(cfg.federation.num_clients)
    # attack.mode=replacement estimates a round's examples from it (fedmed.poisoning.update_scale)
    job["clients_per_round"] = int(cfg.federation.clients_per_round)
    job["rounds"] = int(cfg.federation.rounds)  # DP-SGD spreads a target epsilon over them
    job["fault"] = OmegaConf.to_container(cfg.fault, resolve=True)  # chaos testing, simulation only
    return job


def encode_job(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def decode_job(text: str) -> dict:
    return json.loads(text)
