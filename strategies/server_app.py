"""The Flower ServerApp: runs the rounds, evaluates the global model on the official test split
every round (round 0 included) and writes the run's outputs (listed in the README)."""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fedmed.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointKeeper,
    arrays_to_tensors,
    generator_states,
    restore_generators,
    restore_strategy,
    stopped_summary,
    strategy_state,
    tensors_to_arrays,
)
from fedmed.data import dataset_from_config, write_partitions
from fedmed.detection import RoundDetection
from fedmed.flower_waits import SERVERAPP_PULLS, shorten_object_pull_backoff
from fedmed.job import JOB_KEY, Job, encode_job
from fedmed.logs import log, through_flower_handlers
from fedmed.models import build_model
from fedmed.partition_report import format_label_table, label_count_table, plot_label_counts
from fedmed.poisoning import attack_config, attacks_in_round, backdoor_test_set, malicious_ids
from fedmed.report import MetricsLog
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import model_to_arrays, save_model
from fedmed.shared_arrays import SharedArrays, shared_directory
from fedmed.stopping import StopControl, release_client_actors
from fedmed.train import resolve_device
from strategies.aggregators import Aggregator, aggregator_from_config
from strategies.findings import RoundFindings
from strategies.global_assessment import is_assessment_round
from strategies.global_evaluation import GlobalEvaluation
from strategies.nodes import Federation, discover
from strategies.preflight import prepare_config, simulated_partitions
from strategies.robust_aggregation import RobustAggregation
from strategies.root_update import make_root_update
from strategies.round_record import RoundRecorder
from strategies.rounds import NotEnoughReplies, RoundLoop
from strategies.run_report import report_run
from strategies.strategy import FedMedStrategy


def seed_everything(seed: int) -> None:
    """The server's global generators, from the run's MODEL_INIT stream: torch's draws the
    global model's initial weights. Flower samples with Python's `random`; our strategy has its
    own seeded generator."""
    init_seed = seed_for(seed, Stream.MODEL_INIT)
    random.seed(init_seed)
    np.random.seed(init_seed % 2**32)
    torch.manual_seed(init_seed)


def build_strategy(
    cfg: DictConfig,
    partition_of_node: dict[int, int],
    aggregator: Aggregator,
    reference_update: Callable[[ArrayRecord, torch.Tensor], torch.Tensor] | None = None,
    shared_arrays: SharedArrays | None = None,
) -> FedMedStrategy:
    """``strategy=fedavg``: Flower's FedAvg (``FedMedStrategy``); any other: ``RobustAggregation``
    with that rule, and the server's ``reference_update`` if the rule needs one. Nothing here
    knows which clients are malicious."""
    assess_clients = bool(cfg.eval.clients)
    common = dict(
        clients_per_round=int(cfg.federation.clients_per_round),
        seed=int(cfg.seed),
        fraction_evaluate=float(cfg.federation.fraction_evaluate),
        # the clients' assessment, every site attacking its own share, runs once, after the last round
        assess_round=lambda r: assess_clients and r == int(cfg.federation.rounds) and assessment_round(cfg, r),
        shared_arrays=shared_arrays,
        assess_max_clients=None if cfg.eval.max_clients is None else int(cfg.eval.max_clients),
    )
    if aggregator.streamed:  # Flower's own FedAvg, one reply at a time (strategies.strategy)
        return FedMedStrategy(partition_of_node, **common)
    return RobustAggregation(
        partition_of_node,
        **common,
        aggregator=aggregator,
        reference_update=reference_update if aggregator.needs_root_update else None,
    )


def assessment_round(cfg: DictConfig, server_round: int) -> bool:
    return is_assessment_round(server_round, int(cfg.eval.every), int(cfg.federation.rounds), list(cfg.eval.attacks))


def log_partitions(cfg: DictConfig, dataset, federation: Federation, plots_dir: Path, console: Console) -> None:
    """Examples per client and class: deployed sites' own counts, or the simulated split (a
    summary over the clients in large federations: ``fedmed.partition_report``)."""
    names = None
    if federation.deployed:
        counts = federation.label_counts(dataset.num_classes)
        names = [federation.name(pid) for pid in range(len(counts))]
    else:
        counts = label_count_table(dataset.train.labels, simulated_partitions(cfg, dataset), dataset.num_classes)
    if cfg.progress:
        console.print(format_label_table(counts, list(dataset.class_names), names))
    plot_label_counts(counts, list(dataset.class_names), plots_dir / "partition.png", names)


def sized_to_federation(cfg: DictConfig, num_nodes: int) -> DictConfig:
    """``cfg`` for the nodes that are really there: `flwr run` sizes the federation itself (its
    simulation config or the SuperNodes that connect), and the partitions follow it. A copy:
    the caller's configuration is left as it was."""
    if num_nodes == cfg.federation.num_clients:
        return cfg
    log.warning(
        "the federation has %d nodes, not federation.num_clients=%d; using %d",
        num_nodes,
        cfg.federation.num_clients,
        num_nodes,
    )
    sized = copy.deepcopy(cfg)
    sized.federation.num_clients = num_nodes
    sized.federation.clients_per_round = min(cfg.federation.clients_per_round, num_nodes)
    return sized


def global_model(cfg: DictConfig, dataset) -> torch.nn.Module:
    return build_model(
        cfg.model.name,
        dataset.num_classes,
        dataset.channels,
        pretrained=bool(cfg.model.pretrained),
        weights_path=cfg.model.weights_path,
        freeze_backbone=bool(cfg.model.freeze_backbone),
        norm=str(cfg.model.norm),
        assimilation=str(cfg.model.assimilation),
    )


def client_job(cfg: DictConfig, dataset, partitions_file: Path | None) -> ConfigRecord:
    """What every client gets with its messages: the run's configuration for clients, and what
    deployed sites check their data against."""
    job = Job.from_config(cfg)
    job.num_classes = dataset.num_classes  # deployed sites need it to build the same head
    job.channels, job.image_size = dataset.channels, dataset.image_size
    if partitions_file is not None:
        job.partitions_file = str(partitions_file)
    return ConfigRecord({JOB_KEY: encode_job(job)})


def run_federation(
    grid: Grid,
    cfg: DictConfig,
    output_dir: Path,
    share_arrays: bool = False,
    resume_from: dict | None = None,
    stop: StopControl | None = None,
    keeper: CheckpointKeeper | None = None,
) -> dict:
    """The whole run on the server side; returns the summary it also writes to summary.json.

    The parts, one job each: the strategy aggregates and hands each round's findings over
    (``strategies.findings``), the round loop runs the rounds (``strategies.rounds``), the global
    evaluation scores each round's model (``strategies.global_evaluation``), the recorder writes
    its row (``strategies.round_record``), the keeper its checkpoint, and the report the plots
    and summary (``strategies.run_report``).

    ``share_arrays``: the clients run on this machine, so models travel as files in shared
    memory rather than inside the messages (``fedmed.shared_arrays``; only ``fedmed-sim`` knows).
    ``resume_from``: a checkpoint (``fedmed.checkpoint``) to continue from. ``stop`` and
    ``keeper``: shared with ``fedmed-sim``'s main thread, which handles SIGINT/SIGTERM.
    """
    started = time.monotonic()
    console = Console()
    (output_dir / "plots").mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    seed_everything(seed)
    prepare_config(cfg)

    dataset = dataset_from_config(OmegaConf.to_container(cfg.dataset, resolve=True), seed)
    device = resolve_device(str(cfg.device))
    model = global_model(cfg, dataset)
    aggregator = aggregator_from_config(cfg.strategy)
    attacks, eps = list(cfg.eval.attacks), [float(e) for e in cfg.eval.eps]
    # ground truth of the attack, for scoring detection only: never handed to the strategy
    attack = attack_config(cfg.attack)
    evaluation = GlobalEvaluation(
        model,
        dataset.test,
        device=device,
        batch_size=int(cfg.eval.batch_size),
        assess=lambda server_round: assessment_round(cfg, server_round),
        attacks=attacks,
        eps=eps,
        max_samples=cfg.eval.max_samples,
        assessment_seed=seed_for(seed, Stream.ASSESSMENT),
        backdoor_set=backdoor_test_set(dataset, attack, seed),
        keep_weights=aggregator.needs_root_update,  # FLTrust's root update copies the model
    )
    initial_arrays = model_to_arrays(model)
    if resume_from is not None:
        started -= float(resume_from["elapsed_s"])
    total_rounds = int(cfg.federation.rounds)
    recorder = RoundRecorder(
        MetricsLog(output_dir / "metrics.jsonl", json.loads(resume_from["rows"]) if resume_from else []),
        total_rounds=total_rounds,
        malicious=[],  # the attack's ground truth follows the federation's size, known below
        attacks_in_round=lambda server_round: attacks_in_round(attack, server_round),
        attacks=attacks,
        eps=eps,
        started=started,
        console=console if cfg.progress else None,
        detections=[RoundDetection(**d) for d in json.loads(resume_from["detections"])] if resume_from else None,
        largest_epsilon=list(resume_from["largest_epsilon"]) if resume_from else None,
    )
    if resume_from is None:
        # The initial model is scored, and its line shown, while the nodes come up (in
        # simulation, while the clients' Ray workers import their libraries): it needs nothing
        # from them. Ray's own processes are already running (fedmed.ray_start), so no fork
        # happens under this thread's torch work.
        recorder.record(0, evaluation(0, initial_arrays), RoundFindings(0))

    federation = discover(grid, int(cfg.federation.num_clients), float(cfg.federation.connect_timeout_s))
    if stop is not None:
        stop.take_signals_back()
    cfg = sized_to_federation(cfg, len(federation.partition_of_node))
    malicious = recorder.malicious = malicious_ids(attack, int(cfg.federation.num_clients), seed)
    log_partitions(cfg, dataset, federation, output_dir / "plots", console)
    reference_update = None
    if aggregator.needs_root_update:  # the rule's server-side input (FLTrust's root update)
        reference_update = make_root_update(
            evaluation.load(initial_arrays),
            dataset.val,
            aggregator.root_samples,
            OmegaConf.to_container(cfg.client, resolve=True),
            device=device,
            seed=seed,
            iterations=aggregator.root_iterations,
        )
    shared_arrays = None
    if share_arrays:
        model_bytes = sum(len(array.data) for array in initial_arrays.values())
        shared_arrays = SharedArrays(shared_directory(model_bytes * (int(cfg.federation.clients_per_round) + 2)))
    strategy = build_strategy(cfg, federation.partition_of_node, aggregator, reference_update, shared_arrays)
    strategy.federation = federation
    loop = RoundLoop(
        strategy,
        grid,
        timeout=float(cfg.federation.round_timeout_s),
        min_replies=int(cfg.federation.min_replies),
        stop=stop.requested if stop else None,
    )
    keeper = keeper or CheckpointKeeper(output_dir / CHECKPOINT_FILE, int(cfg.checkpoint.every))

    def evaluate_round(server_round: int, arrays: ArrayRecord, findings: RoundFindings) -> MetricRecord:
        row = recorder.record(server_round, evaluation(server_round, arrays), findings)
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        def snapshot() -> dict:
            state = recorder.state()
            return {
                "arrays": arrays_to_tensors(arrays, copy=False),  # saved, never written to
                "strategy": strategy_state(strategy),
                "clients": json.dumps(loop.client_states),
                "generators": generator_states(),
                "rows": json.dumps(state["rows"]),
                "detections": json.dumps(state["detections"]),
                "largest_epsilon": state["largest_epsilon"],
                "elapsed_s": time.monotonic() - started,
            }

        keeper.end_of_round(server_round, total_rounds, snapshot)

    partitions_file = None
    if shared_arrays is not None and not federation.deployed:
        # the clients read their own slice of the server's split instead of each cutting all of it
        partitions_file = write_partitions(
            simulated_partitions(cfg, dataset), shared_arrays.directory / "partitions.npy"
        )
    job = client_job(cfg, dataset, partitions_file)
    if resume_from is None:
        arrays, first_round = initial_arrays, 1
        end_of_round(0, arrays)
    else:
        arrays, first_round = tensors_to_arrays(resume_from["arrays"]), int(resume_from["round"]) + 1
        restore_strategy(strategy, resume_from["strategy"])
        loop.client_states = {int(pid): records for pid, records in json.loads(resume_from["clients"]).items()}
        restore_generators(resume_from["generators"])
        log.warning("resuming %s after round %d of %d", output_dir, first_round - 1, total_rounds)
    # the loop holds the only reference to the starting model, so it is freed once replaced
    # (this frame keeping it held one model more, 45 MB for ResNet18, through the whole run)
    start = [arrays]
    del arrays, initial_arrays
    try:
        final_arrays = loop.run(
            start.pop(),
            first_round=first_round,
            num_rounds=total_rounds,
            train_config=job,
            evaluate_config=ConfigRecord(dict(job)),
            evaluate_fn=evaluate_round,
            end_of_round=end_of_round,
        )
    except NotEnoughReplies as error:
        keeper.close()
        stopped_summary(output_dir, keeper, str(error), time.monotonic() - started)
        raise
    finally:
        if shared_arrays is not None:
            shared_arrays.close()
        if stop is not None:
            stop.clients_stuck = loop.timed_out
    save_model(evaluation.load(final_arrays), output_dir / "model.safetensors")
    return report_run(
        cfg,
        output_dir,
        recorder.metrics_log.rows,
        attack=attack,
        malicious=malicious,
        detections=recorder.detections,
        started=started,
        console=console if cfg.progress else None,
    )


def config_from_run_config(run_config: dict) -> tuple[DictConfig, Path]:
    """`flwr run .`: compose the Hydra config from the run config's ``overrides`` string."""
    import configs

    cfg = configs.compose(str(run_config.get("overrides", "")).split())
    # relative to the SuperLink's working directory: the server app runs where the SuperLink does
    output_dir = Path(cfg.output_dir or f"outputs/flwr-run-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, output_dir.expanduser().resolve()


def make_server_app(
    cfg: DictConfig,
    output_dir: Path,
    share_arrays: bool = False,
    resume_from: dict | None = None,
    stop: StopControl | None = None,
    keeper: CheckpointKeeper | None = None,
) -> ServerApp:
    """A ServerApp bound to an already composed configuration (used by `fedmed-sim`, which
    knows whether its clients share this machine: ``share_arrays``, and handles signals)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg, output_dir, share_arrays, resume_from, stop, keeper)
        finally:
            if stop is not None and stop.clients_stuck:
                # some client never replied: its Ray worker may wait for good, and Flower with it
                log.warning(
                    "ending the %d ClientApp actors: a client did not reply and its call may never return",
                    release_client_actors(),
                )

    return server_app


app = ServerApp()


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    # in the process Flower starts nothing configures logging: fedmed.logs
    through_flower_handlers()
    yield


@app.main()
def main(grid: Grid, context: Context) -> None:
    # replies' arrays are still arriving at the SuperLink when their message is announced
    shorten_object_pull_backoff((SERVERAPP_PULLS,))
    cfg, output_dir = config_from_run_config(dict(context.run_config))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("fedmed: writing outputs to %s; test split: dataset=%s (on this server)", output_dir, cfg.dataset.name)
    run_federation(grid, cfg, output_dir)
