"""Checks of a composed configuration made before any process starts, and the simulated split.

Kept apart from ``strategies.server_app`` so that ``fedmed-sim`` can run them before it imports
the server's heavier parts (torchvision, matplotlib) and before Ray starts.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fedmed.config import check_assimilation
from fedmed.data import client_partitions
from fedmed.datasets import dataset_config
from fedmed.defenses import defense_config, defense_named, model_norm_for
from fedmed.logs import log
from strategies.aggregators import TooFewReplies, aggregator_from_config
from strategies.global_assessment import check_eval_config


def prepare_config(cfg: DictConfig) -> None:
    """Checks that need no data, and the model DP-SGD requires (GroupNorm, said once here)."""
    dataset = dataset_config(cfg.dataset)
    check_assimilation(
        cfg.assimilation,
        str(cfg.model.assimilation),
        defense_config(cfg.defense),
        freeze_backbone=bool(cfg.model.freeze_backbone),
        # `size`, the images' side in pixels: every option so far has it (None skips the check)
        image_size=getattr(dataset, "size", None),
        rounds=int(cfg.federation.rounds),
    )
    aggregator = aggregator_from_config(cfg.strategy)  # its values checked before Ray starts
    try:
        aggregator.check_replies(int(cfg.federation.clients_per_round))
    except TooFewReplies as error:
        raise ValueError(f"{error} (federation.clients_per_round={cfg.federation.clients_per_round})") from None
    check_eval_config(list(cfg.eval.attacks), [float(e) for e in cfg.eval.eps], cfg.eval.max_samples)
    if cfg.client.balanced_sampling and defense_named(str(cfg.defense.name)).per_example_gradients:
        raise ValueError(
            f"client.balanced_sampling=true with defense={cfg.defense.name}: DP-SGD's privacy accounting "
            "assumes Poisson sampling at one rate for every example; set client.balanced_sampling=false"
        )
    norm = model_norm_for(str(cfg.model.norm), str(cfg.defense.name))
    if norm != cfg.model.norm:
        log.warning(
            "defense=%s: BatchNorm mixes examples, so DP-SGD cannot clip per-example gradients; every "
            "model (clients' and server's) uses model.norm=%s (Opacus ModuleValidator.fix)",
            cfg.defense.name,
            norm,
        )
        cfg.model.norm = norm


def simulated_partitions(cfg: DictConfig, dataset) -> list:
    """Every simulated client's train-split indices (cut once per process, ``fedmed.data``)."""
    return client_partitions(
        dataset.train.labels,
        int(cfg.federation.num_clients),
        OmegaConf.to_container(cfg.partition),
        int(cfg.seed),
        dataset.name,
    )
