"""Hydra structured configuration: the schema behind configs/ (the README's configuration table).

The dataclasses make Hydra reject typos (an unknown key or a wrong type fails with the key's
name) and give every field its documented default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from fedmed.architectures import ARCHITECTURES
from fedmed.assimilation import check_kind
from fedmed.datasets import DatasetConfig
from fedmed.datasets import store_configs as store_datasets
from fedmed.defenses import DefenseConfig, defense_named
from fedmed.defenses import store_configs as store_defenses
from fedmed.poisoning import AttackConfig
from fedmed.poisoning import store_configs as store_attacks


@dataclass
class ModelConfig:
    name: str = "resnet18"
    pretrained: bool = False
    weights_path: Optional[str] = None
    freeze_backbone: bool = False
    # "batch" (BatchNorm, running statistics averaged with the weights by FedAvg; measured to
    # rise most steadily with plain SGD) or "group" (GroupNorm, as DP-SGD requires)
    norm: str = "batch"
    # domain-assimilation modules before the backbone (fedmed/assimilation.py):
    # none | texture | colour | both; their training settings are the `assimilation` section
    assimilation: str = "none"


@dataclass
class AssimilationConfig:
    """Training of the domain-assimilation modules that ``model.assimilation`` selects."""

    # loss = cross entropy + texture_weight * mean |GLCM statistics(input) - (adapted image)|
    texture_weight: float = 1.0
    levels: int = 8  # grey levels of the soft GLCM
    distances: list[int] = field(default_factory=lambda: [1, 2, 4])  # at 0, 45, 90, 135 degrees
    # the backbone (all but its head) is frozen for the first K rounds while modules and head learn
    freeze_backbone_rounds: int = 0


@dataclass
class PartitionConfig:
    name: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    site_strength: float = 1.0


@dataclass
class FederationConfig:
    num_clients: int = 4
    clients_per_round: int = 4
    rounds: int = 5
    # share of clients that also evaluate the global model on their local hold-out each round
    fraction_evaluate: float = 0.0
    round_timeout_s: float = 3600.0
    # a round completes with at least this many valid replies; fewer stop the run, resumably
    min_replies: int = 1
    # how long the server waits for num_clients nodes to connect (deployment, `flwr run`)
    connect_timeout_s: float = 600.0


@dataclass
class ClientConfig:
    epochs: int = 1
    batch_size: int = 32
    # Plain SGD: local momentum, restarted every round, made the global model on PneumoniaMNIST
    # flip between predicting one class and the other; SGD 0.01 without it rose steadily
    # (README, "Defaults, and why"). dataset=synthetic picks Adam for its data (fedmed/datasets/synthetic.py).
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 5e-4
    augment: bool = True
    # share of each client's partition held out for its own evaluation
    val_fraction: float = 0.1
    # autocast in local training and the clients' evaluation: off | bf16 | fp16 (CUDA only)
    amp: str = "off"
    # model and batches in the channels-last memory layout
    channels_last: bool = False
    # draw each epoch's batches with every class of the client's share equally likely (with
    # replacement, one epoch = as many draws as the share has images): the sampling form of class
    # weights. Small, skewed medical shares otherwise pull the model to the majority class
    balanced_sampling: bool = False


@dataclass
class StrategyConfig:
    """Base of every aggregation rule's structured config (one per rule, in its module of
    strategies/aggregators/, which cites its paper); ``strategy=<name>`` picks the option."""

    name: str = MISSING


@dataclass
class EvalConfig:
    # robustness of the global model (and of each client's model on its validation share) is
    # assessed every `every` rounds (round 0 included) and after the last one; clean test
    # metrics are computed every round regardless
    every: int = 5
    batch_size: int = 256
    attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    # a fixed, seeded subset of this many test images (and of each client's validation share);
    # None: all of them. PGD-10 at four epsilons costs 44 gradient passes per image: on the whole
    # test split it was most of the default command's time (README, "Robustness of the global model")
    max_samples: Optional[int] = 128
    # clients also report robust accuracy on their own validation share, after the last round
    clients: bool = True
    # at most this many clients (a seeded sample of those online) do so; None: every client.
    # In a federation of 1000 that is 1000 calls after the last round
    max_clients: Optional[int] = None


@dataclass
class RayConfig:
    # None: start a local Ray instance; "auto" or "host:port": join an existing cluster
    address: Optional[str] = None
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    # None: every core of this machine
    num_cpus: Optional[int] = None
    # how the model reaches simulated clients and comes back: "shared_memory" (a file per model
    # in /dev/shm, only its path in the message: the clients must run on this machine),
    # "message" (inside Flower's messages, through Ray's object store), "auto" (shared_memory
    # unless ray.address joins a cluster)
    model_transport: str = "auto"


@dataclass
class FaultConfig:
    """One injected fault (simulation only, clients/faults.py): chaos testing of a federation."""

    kind: str = "raise"  # raise | hang | garbage
    partitions: list[int] = field(default_factory=list)
    start_round: int = 1  # the fault acts from this round on
    phase: str = "train"  # train | evaluate (garbage: train only, its reply carries weights)
    # garbage: what is wrong with the reply: nan | inf | huge (finite 3e38) | shape | dtype |
    # missing_key | negative_count | absurd_count
    garbage: str = "nan"
    hang_s: Optional[float] = None  # hang: seconds; None: for good


@dataclass
class CheckpointConfig:
    every: int = 1  # write checkpoint.pt every this many rounds (and when a run stops early)


@dataclass
class Config:
    # one option of fedmed/datasets/, each with its own keys (dataset=<name> picks it)
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    partition: PartitionConfig = MISSING
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    # one option of fedmed/defenses/, each with its own keys (defense=<name> picks it)
    defense: DefenseConfig = MISSING
    assimilation: AssimilationConfig = field(default_factory=AssimilationConfig)
    # one option of fedmed/poisoning/, each with its own keys (attack=<name> picks it)
    attack: AttackConfig = MISSING
    strategy: StrategyConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault: list[FaultConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # a run folder to continue from its checkpoint (its config.yaml is the configuration)
    resume: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    # None: Hydra's run folder
    output_dir: Optional[str] = None
    # console progress: set false for quiet runs (tests, sweeps)
    progress: bool = True


def register_configs() -> None:
    """Register the schema so that configs/*.yaml are validated against it."""
    from hydra.core.config_store import ConfigStore  # Hydra only where configs are composed

    config_store = ConfigStore.instance()
    config_store.store(name="fedmed_schema", node=Config)
    store_datasets(config_store)
    store_defenses(config_store)
    store_attacks(config_store)
    for name in ARCHITECTURES:  # model=<name>: every architecture of fedmed/architectures.py
        config_store.store(group="model", name=name, node=ModelConfig(name=name))


OPTIMIZERS = ("sgd", "adam", "adamw")


def check_client(client: ClientConfig, device: str = "auto") -> None:
    """Refuse local-training settings that would fail inside every client, naming the key.
    ``client``: the typed section (or its DictConfig)."""
    if client.optimizer not in OPTIMIZERS:
        raise ValueError(f"client.optimizer={client.optimizer!r} is not known; use one of {', '.join(OPTIMIZERS)}")
    for key in ("epochs", "batch_size"):
        if int(getattr(client, key)) < 1:
            raise ValueError(f"client.{key}={getattr(client, key)} must be >= 1")
    if not float(client.lr) > 0:
        raise ValueError(f"client.lr={client.lr} must be > 0 (e.g. 0.01 for SGD, 0.001 for Adam)")
    if not 0 <= float(client.momentum) < 1:
        raise ValueError(f"client.momentum={client.momentum} must be in [0, 1)")
    if float(client.weight_decay) < 0:
        raise ValueError(f"client.weight_decay={client.weight_decay} must be >= 0")
    if not 0 <= float(client.val_fraction) < 1:
        raise ValueError(f"client.val_fraction={client.val_fraction} must be in [0, 1) (share held out locally)")
    from fedmed.precision import check_precision

    check_precision(client.amp, client.channels_last)
    if client.amp == "fp16" and str(device) == "cpu":
        raise ValueError(
            "client.amp=fp16 needs a CUDA device (loss scaling) and device=cpu is set; use client.amp=bf16"
        )


def check_eval(eval_cfg: EvalConfig) -> None:
    """The assessment's schedule and batch size (the attacks and epsilons: strategies/global_assessment.py)."""
    if int(eval_cfg.every) < 1:
        raise ValueError(f"eval.every={eval_cfg.every} must be >= 1 (robustness assessed every N rounds)")
    if int(eval_cfg.batch_size) < 1:
        raise ValueError(f"eval.batch_size={eval_cfg.batch_size} must be >= 1")
    if eval_cfg.max_clients is not None and int(eval_cfg.max_clients) < 1:
        raise ValueError(f"eval.max_clients={eval_cfg.max_clients} must be >= 1, or null for every client")


def check_assimilation(
    assimilation: AssimilationConfig,
    kind: str,
    defense: DefenseConfig,
    *,
    freeze_backbone: bool = False,
    image_size: int | None = None,
    rounds: int | None = None,
) -> None:
    """Refuse assimilation settings that cannot work, naming the key. ``assimilation`` is the
    typed ``assimilation`` section (or its DictConfig), ``kind`` is ``model.assimilation``,
    ``defense`` the typed ``defense`` section; ``image_size`` and ``rounds`` are checked where
    they are known (the server)."""
    check_kind(kind)
    weight, levels = assimilation.texture_weight, assimilation.levels
    distances, frozen = list(assimilation.distances), assimilation.freeze_backbone_rounds
    if not weight >= 0 or weight == float("inf"):
        raise ValueError(f"assimilation.texture_weight={weight} must be a finite number >= 0 (0: no texture loss)")
    if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 256:
        raise ValueError(f"assimilation.levels={levels!r} must be an integer from 2 to 256 (grey levels of the GLCM)")
    if not distances or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in distances):
        raise ValueError(f"assimilation.distances={distances} must be a non-empty list of integers >= 1 (pixels)")
    if image_size is not None and max(distances) >= image_size:
        raise ValueError(
            f"assimilation.distances={distances} reach past a {image_size}-pixel image "
            f"(dataset.size={image_size}): every distance must be below it"
        )
    if isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0:
        raise ValueError(f"assimilation.freeze_backbone_rounds={frozen!r} must be an integer >= 0")
    if frozen > 0 and freeze_backbone:
        raise ValueError(
            f"assimilation.freeze_backbone_rounds={frozen} unfreezes the backbone after {frozen} "
            "rounds, but model.freeze_backbone=true keeps it frozen throughout: set one of them only"
        )
    if rounds is not None and frozen > 0 and frozen >= rounds:
        raise ValueError(
            f"assimilation.freeze_backbone_rounds={frozen} >= federation.rounds={rounds}: the "
            "backbone would never train; use model.freeze_backbone=true for that"
        )
    clips_each_example = defense_named(defense.name).per_example_gradients
    if kind != "none" and weight > 0 and clips_each_example and getattr(defense, "adversarial", None) is not None:
        raise ValueError(
            f"assimilation.texture_weight={weight} with defense={defense.name} and defense.adversarial: the texture "
            "loss on the clean image needs a second backward pass, which Opacus's per-example clipping "
            "refuses; set assimilation.texture_weight=0 or drop defense.adversarial"
        )
