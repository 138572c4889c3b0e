"""The part of the configuration that travels to clients with every message: a typed ``Job``.

The server sends it as JSON in the message's ConfigRecord, so that simulated clients and real
SuperNodes at hospitals are configured the same way, by the run they take part in. A client
rebuilds the typed job from it: each section through its option's structured config (the
registries of ``fedmed.datasets``, ``fedmed.defenses``, ``fedmed.poisoning``), the rest through
``OmegaConf.structured``, so a wrong key or type is refused with its name before any training.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fedmed.config import (
    AssimilationConfig,
    ClientConfig,
    EvalConfig,
    FaultConfig,
    ModelConfig,
    PartitionConfig,
    check_client,
    check_eval,
)
from fedmed.datasets import dataset_config
from fedmed.defenses import defense_config
from fedmed.poisoning import attack_config

JOB_KEY = "fedmed-job"
# set in an evaluate message's config on rounds where clients also assess robustness
ASSESS_KEY = "assess-robustness"
# the sections whose keys depend on the option chosen; typed by their registries
_OPTION_SECTIONS = ("dataset", "defense", "attack")


@dataclass
class Job:
    """What a client needs: data, model, local training, seed and device. Every field has a
    default, so tests and tools can build the part of a job they use."""

    # one option of fedmed/datasets/ (its typed config); None: a job that loads no dataset
    dataset: Any = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    defense: Any = None  # one option of fedmed/defenses/; None reads as defense=none
    assimilation: AssimilationConfig = field(default_factory=AssimilationConfig)
    attack: Any = None  # one option of fedmed/poisoning/; None reads as attack=none
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    num_clients: int = 1
    # attack.mode=replacement estimates a round's examples from it (fedmed.poisoning.update_scale);
    # None: every client
    clients_per_round: Optional[int] = None
    rounds: Optional[int] = None  # DP-SGD spreads a target epsilon over them
    fault: list[FaultConfig] = field(default_factory=list)  # chaos testing, simulation only
    # set by the server from its test split: deployed sites build the same head and check their data
    num_classes: Optional[int] = None
    channels: Optional[int] = None
    image_size: Optional[int] = None
    # the server's cut of every partition (fedmed.data.write_partitions), read by simulated clients
    partitions_file: Optional[str] = None

    def __post_init__(self) -> None:
        self.defense = defense_config({"name": "none"} if self.defense is None else self.defense)
        self.attack = attack_config(self.attack)
        if self.dataset is not None:
            self.dataset = dataset_config(self.dataset)

    @property
    def round_size(self) -> int:
        """Clients sampled in a round."""
        return self.num_clients if self.clients_per_round is None else self.clients_per_round

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Job:
        """The job of a composed run configuration (before the server knows its test split)."""
        plain = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in _SECTIONS}
        return cls.from_plain(
            {
                **plain,
                "seed": cfg.seed,
                "device": cfg.device,
                "num_clients": cfg.federation.num_clients,
                "clients_per_round": cfg.federation.clients_per_round,
                "rounds": cfg.federation.rounds,
                "fault": OmegaConf.to_container(cfg.fault, resolve=True),
            }
        )

    @classmethod
    def from_plain(cls, plain: Mapping) -> Job:
        """The typed, checked job of a plain dict (what JSON decodes to); absent keys take their
        defaults. A key this fedmed does not know, or a value of the wrong type or out of range,
        is refused by name."""
        plain = dict(plain)
        options = {name: plain.pop(name) for name in _OPTION_SECTIONS if plain.get(name) is not None}
        try:
            rest = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), plain))
        except OmegaConfBaseException as error:
            if isinstance(error, ConfigKeyError):
                raise ValueError(
                    f"the job has key {error.full_key!r}, which this fedmed does not know: the server "
                    "runs another fedmed version than this client; run the same version on both"
                ) from None
            raise ValueError(f"the job's {error.full_key}: {error.msg.splitlines()[0]}") from None
        job = dataclasses.replace(rest, **options)
        check_client(job.client, job.device)
        check_eval(job.eval)
        return job

    def to_plain(self) -> dict:
        """The job as plain values (JSON-ready); :meth:`from_plain` reads it back."""
        return dataclasses.asdict(self)


_SECTIONS = ("dataset", "partition", "model", "client", "defense", "assimilation", "attack", "eval")


def encode_job(job: Job) -> str:
    return json.dumps(job.to_plain(), sort_keys=True)


def decode_job(text: str) -> Job:
    return Job.from_plain(json.loads(text))
