"""The Flower ServerApp: runs the rounds, evaluates the global model on the official test split
every round (round 0 included) and writes the run's outputs (listed in the README)."""

from __future__ import annotations

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
from fedmed.data import PARTITIONS_FILE_KEY, dataset_from_config, write_partitions
from fedmed.detection import RoundDetection, run_totals, score_round
from fedmed.job import JOB_KEY, encode_job, job_from_config
from fedmed.logs import log, through_flower_handlers
from fedmed.models import build_model
from fedmed.partition import format_label_table, label_count_table, plot_label_counts
from fedmed.poisoning import (
    MaliciousClientsConfig,
    attack_config,
    attacks_in_round,
    backdoor_asr,
    backdoor_test_set,
    malicious_ids,
)
from fedmed.report import (
    MetricsLog,
    plot_backdoor_per_round,
    plot_robustness_per_round,
    plot_robustness_vs_eps,
    plot_rounds,
    print_summary,
    round_line,
    write_summary,
)
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import load_arrays, model_to_arrays, save_model
from fedmed.shared_arrays import SharedArrays, shared_directory
from fedmed.stopping import StopControl, release_client_actors
from fedmed.train import evaluate, resolve_device
from strategies.aggregators import make_aggregator
from strategies.global_assessment import global_robustness, is_assessment_round, weakest_client
from strategies.nodes import Federation, discover
from strategies.preflight import prepare_config, simulated_partitions
from strategies.robust_aggregation import RobustAggregation
from strategies.root_update import make_root_update
from strategies.rounds import NotEnoughReplies, RoundLoop
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
    reference_update: Callable[[ArrayRecord, torch.Tensor], torch.Tensor] | None = None,
    shared_arrays: SharedArrays | None = None,
) -> FedMedStrategy:
    """``strategy=fedavg``: Flower's FedAvg (``FedMedStrategy``); any other: ``RobustAggregation``
    with that rule. Nothing here knows which clients are malicious."""
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
    params = OmegaConf.to_container(cfg.strategy, resolve=True)
    name = params.pop("name")
    aggregator = make_aggregator(name, **params)  # refuses unknown names and misplaced keys
    if name == "fedavg":
        return FedMedStrategy(partition_of_node, **common)
    return RobustAggregation(
        partition_of_node,
        **common,
        aggregator=aggregator,
        reference_update=reference_update if name == "fltrust" else None,
    )


def assessment_round(cfg: DictConfig, server_round: int) -> bool:
    return is_assessment_round(server_round, int(cfg.eval.every), int(cfg.federation.rounds), list(cfg.eval.attacks))


def log_partitions(cfg: DictConfig, dataset, federation: Federation, plots_dir: Path, console: Console) -> None:
    """Examples per client and class: deployed sites' own counts, or the simulated split (a
    summary over the clients in large federations: ``fedmed.partition``)."""
    names = None
    if federation.deployed:
        counts = federation.label_counts(dataset.num_classes)
        names = [federation.name(pid) for pid in range(len(counts))]
    else:
        counts = label_count_table(dataset.train.labels, simulated_partitions(cfg, dataset), dataset.num_classes)
    if cfg.progress:
        console.print(format_label_table(counts, list(dataset.class_names), names))
    plot_label_counts(counts, list(dataset.class_names), plots_dir / "partition.png", names)


def round_detection(
    strategy: FedMedStrategy, server_round: int, malicious: list[int], attacking: bool
) -> RoundDetection | None:
    """Score the strategy's flags of one round against the ground truth, which only this runner
    holds (the strategy never sees ``malicious``). A rejected reply counts as flagged."""
    decisions = strategy.detection.get(server_round)
    rejected = [r.partition_id for r in strategy.rejections.get(server_round, []) if r.partition_id is not None]
    accepted = [int(c["partition-id"]) for c in strategy.client_train_metrics.get(server_round, [])]
    if not accepted and not rejected:
        return None
    flagged = (decisions["flagged"] if decisions else []) + rejected
    return score_round(flagged, accepted + rejected, malicious if attacking else [])


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

    ``share_arrays``: the clients run on this machine, so models travel as files in shared
    memory rather than inside the messages (``fedmed.shared_arrays``; only ``fedmed-sim`` knows).
    ``resume_from``: a checkpoint (``fedmed.checkpoint``) to continue from. ``stop`` and
    ``keeper``: shared with ``fedmed-sim``'s main thread, which handles SIGINT/SIGTERM.
    """
    started = time.monotonic()
    console = Console()
    output_dir.mkdir(parents=True, exist_ok=True)
    plots_dir = output_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    seed = int(cfg.seed)
    seed_everything(seed)
    prepare_config(cfg)

    # Ask the nodes first: in simulation this waits until Ray has started its processes, and
    # heavy numpy/torch work in this thread while Ray forks them can deadlock the fork.
    federation = discover(grid, int(cfg.federation.num_clients), float(cfg.federation.connect_timeout_s))
    partition_of_node = federation.partition_of_node
    if stop is not None:
        stop.take_signals_back()
    if len(partition_of_node) != cfg.federation.num_clients:
        # `flwr run` sizes the federation itself (its simulation config or the SuperNodes that
        # connect); the partitions follow the nodes that are really there.
        log.warning(
            "the federation has %d nodes, not federation.num_clients=%d; using %d",
            len(partition_of_node),
            cfg.federation.num_clients,
            len(partition_of_node),
        )
        cfg.federation.num_clients = len(partition_of_node)
        cfg.federation.clients_per_round = min(cfg.federation.clients_per_round, len(partition_of_node))
    dataset = dataset_from_config(OmegaConf.to_container(cfg.dataset, resolve=True), seed)
    log_partitions(cfg, dataset, federation, plots_dir, console)
    device = resolve_device(str(cfg.device))
    model = build_model(
        cfg.model.name,
        dataset.num_classes,
        dataset.channels,
        pretrained=bool(cfg.model.pretrained),
        weights_path=cfg.model.weights_path,
        freeze_backbone=bool(cfg.model.freeze_backbone),
        norm=str(cfg.model.norm),
        assimilation=str(cfg.model.assimilation),
    )
    reference_update = None
    if cfg.strategy.name == "fltrust":
        reference_update = make_root_update(
            model,
            dataset.val,
            int(cfg.strategy.root_samples),
            OmegaConf.to_container(cfg.client, resolve=True),
            device=device,
            seed=seed,
            iterations=cfg.strategy.root_iterations,
        )
    initial_arrays = model_to_arrays(model)
    shared_arrays = None
    if share_arrays:
        model_bytes = sum(len(array.data) for array in initial_arrays.values())
        shared_arrays = SharedArrays(shared_directory(model_bytes * (int(cfg.federation.clients_per_round) + 2)))
    strategy = build_strategy(cfg, partition_of_node, reference_update, shared_arrays)
    strategy.federation = federation
    resumed_rows = json.loads(resume_from["rows"]) if resume_from else []
    metrics_log = MetricsLog(output_dir / "metrics.jsonl", resumed_rows)
    keeper = keeper or CheckpointKeeper(output_dir / CHECKPOINT_FILE, int(cfg.checkpoint.every))
    loop = RoundLoop(
        strategy,
        grid,
        timeout=float(cfg.federation.round_timeout_s),
        min_replies=int(cfg.federation.min_replies),
        stop=stop.requested if stop else None,
    )
    total_rounds = int(cfg.federation.rounds)
    test = dataset.test

    attacks, eps = list(cfg.eval.attacks), [float(e) for e in cfg.eval.eps]
    largest_epsilon: list[float] = list(resume_from["largest_epsilon"]) if resume_from else []
    # ground truth of the attack, for scoring detection only: never handed to the strategy
    attack = attack_config(cfg.attack)
    malicious = malicious_ids(attack, int(cfg.federation.num_clients), seed)
    backdoor_set = backdoor_test_set(dataset, attack, seed)
    detections = [RoundDetection(**d) for d in json.loads(resume_from["detections"])] if resume_from else []

    # While the clients train, the server's model needs no weights: it gets the new global model
    # to evaluate it, so its own storage is freed in between (45 MB for ResNet18 at the run's
    # peak, the end of training). Not with FLTrust, whose root update copies this model, nor when
    # the state dict does not cover every tensor (what it lacks would come back uninitialised).
    hold_weights = reference_update is not None or set(model.state_dict()) != {
        name for name, _ in (*model.named_parameters(), *model.named_buffers())
    }
    home = [next(model.parameters()).device]  # where the weights go back to

    def load_global(arrays: ArrayRecord) -> None:
        if not hold_weights:
            model.to_empty(device=home[0])
        load_arrays(model, arrays)

    def release_weights() -> None:
        if not hold_weights:
            home[0] = next(model.parameters()).device
            model.to_empty(device="meta")

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        row: dict = {"round": server_round}
        load_global(arrays)
        row.update(evaluate(model, test.images, test.labels, batch_size=int(cfg.eval.batch_size), device=device))
        if assessment_round(cfg, server_round):
            row.update(
                global_robustness(
                    model,
                    test.images,
                    test.labels,
                    attacks=attacks,
                    eps=eps,
                    max_samples=cfg.eval.max_samples,
                    batch_size=int(cfg.eval.batch_size),
                    device=device,
                    seed=seed_for(seed, Stream.ASSESSMENT),
                )
            )
        if backdoor_set is not None:
            row["backdoor/asr"] = backdoor_asr(model, backdoor_set, batch_size=int(cfg.eval.batch_size), device=device)
        release_weights()
        detection = round_detection(strategy, server_round, malicious, attacks_in_round(attack, server_round))
        if detection is not None:
            detections.append(detection)
            row.update(detection.metrics())
            decisions = strategy.detection.get(server_round)
            if decisions:
                row["detection/scores"] = {str(pid): score for pid, score in decisions["scores"].items()}
        clients = strategy.client_train_metrics.get(server_round, [])
        row["num_clients"] = len(clients)
        if clients:
            total = sum(c["num-examples"] for c in clients)
            row["train_loss"] = sum(c["train_loss"] * c["num-examples"] for c in clients) / total
            spent = [c["privacy_epsilon"] for c in clients if "privacy_epsilon" in c]
            if spent:
                largest_epsilon.append(max(spent))
        if largest_epsilon:
            row["privacy/epsilon"] = max(largest_epsilon)
        row["clients"] = clients
        row["rejected"] = [vars(r) for r in strategy.rejections.get(server_round, [])]
        row["failures"] = loop.failures.get(server_round, [])
        if server_round in loop.skipped:
            row["skipped"] = loop.skipped[server_round]
        if server_round in strategy.train_step_time_s:
            row["train_step_time_s"] = strategy.train_step_time_s[server_round]
        if strategy.client_eval_metrics.get(server_round):
            row["client_eval"] = strategy.client_eval_metrics[server_round]
            row.update(weakest_client(row["client_eval"], attacks, eps))
        row["time_s"] = time.monotonic() - started
        metrics_log.append(row)
        if cfg.progress:
            done = max(server_round, 1)
            per_round = (row["time_s"] - metrics_log.rows[0]["time_s"]) / done if server_round else None
            left = per_round * (total_rounds - server_round) if per_round is not None else None
            console.print(round_line(row, total_rounds, left))
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})

    def snapshot(arrays: ArrayRecord) -> dict:
        return {
            "arrays": arrays_to_tensors(arrays, copy=False),  # saved, never written to
            "strategy": strategy_state(strategy),
            "clients": json.dumps(loop.client_states),
            "generators": generator_states(),
            "rows": json.dumps(metrics_log.rows),
            "detections": json.dumps([vars(d) for d in detections]),
            "largest_epsilon": list(largest_epsilon),
            "elapsed_s": time.monotonic() - started,
        }

    def end_of_round(server_round: int, arrays: ArrayRecord) -> None:
        keeper.end_of_round(server_round, total_rounds, lambda: snapshot(arrays))

    job = job_from_config(cfg)
    job["num_classes"] = dataset.num_classes  # deployed sites need it to build the same head
    job["channels"], job["image_size"] = dataset.channels, dataset.image_size  # sites check their data against them
    if shared_arrays is not None and not federation.deployed:
        # the clients read their own slice of the server's split instead of each cutting all of it
        path = write_partitions(simulated_partitions(cfg, dataset), shared_arrays.directory / "partitions.npy")
        job[PARTITIONS_FILE_KEY] = str(path)
    if resume_from is None:
        arrays, first_round = initial_arrays, 1
        evaluate_global(0, arrays)
        end_of_round(0, arrays)
    else:
        arrays, first_round = tensors_to_arrays(resume_from["arrays"]), int(resume_from["round"]) + 1
        restore_strategy(strategy, resume_from["strategy"])
        loop.client_states = {int(pid): records for pid, records in json.loads(resume_from["clients"]).items()}
        started -= float(resume_from["elapsed_s"])
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
            train_config=ConfigRecord({JOB_KEY: encode_job(job)}),
            evaluate_config=ConfigRecord({JOB_KEY: encode_job(job)}),
            evaluate_fn=evaluate_global,
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
    load_global(final_arrays)
    save_model(model, output_dir / "model.safetensors")
    title = (
        f"{cfg.model.name} on {cfg.dataset.name}, {cfg.federation.num_clients} clients "
        f"({cfg.partition.name} partition), {cfg.strategy.name}"
    )
    plot_rounds(metrics_log.rows, plots_dir / "accuracy.png", title)
    if any(key.startswith("adv/") for row in metrics_log.rows for key in row):
        plot_robustness_per_round(metrics_log.rows, plots_dir / "robustness_per_round.png", title)
        plot_robustness_vs_eps(metrics_log.rows, plots_dir / "robustness_vs_eps.png", title)
    extra = {
        "rejected_replies": sum(len(row.get("rejected", [])) for row in metrics_log.rows),
        "failed_clients": sum(len(row.get("failures", [])) for row in metrics_log.rows),
        **run_status(metrics_log.rows),
    }
    if isinstance(attack, MaliciousClientsConfig):
        plot_backdoor_per_round(
            metrics_log.rows, plots_dir / "asr.png", f"{title}, attack={attack.name}", int(attack.start_round)
        )
        extra["attack"] = {
            "name": attack.name,
            "malicious_partitions": malicious,
            **backdoor_summary(metrics_log.rows, int(attack.start_round)),
        }
    extra["detection"] = {"strategy": str(cfg.strategy.name), **run_totals(detections)}
    extra["config"] = OmegaConf.to_container(cfg, resolve=True)
    summary = write_summary(output_dir / "summary.json", metrics_log.rows, time.monotonic() - started, extra)
    if cfg.progress:
        print_summary(metrics_log.rows, title, console)
    return summary


def run_status(rows: list[dict]) -> dict:
    """``degraded`` when a client was lost during the run (the rounds went on without it)."""
    lost = sorted({str(f["client"]) for row in rows for f in row.get("failures", []) if f.get("kind") == "lost"})
    return {"status": "degraded" if lost else "completed", "lost_clients": lost}


def backdoor_summary(rows: list[dict], start_round: int) -> dict:
    """ASR just before the attack (the clean model's error on tail inputs), at the end, and its
    maximum over the attacked rounds: the rise over the first is what shows the backdoor."""
    asr = {row["round"]: row.get("backdoor/asr") for row in rows}
    attacked = [v for r, v in asr.items() if r >= start_round and v is not None]
    return {
        "asr_before_attack": asr.get(start_round - 1),
        "asr_final": rows[-1].get("backdoor/asr") if rows else None,
        "asr_max": max(attacked) if attacked else None,
    }


def config_from_run_config(run_config: dict) -> tuple[DictConfig, Path]:
    """`flwr run .`: compose the Hydra config from the run config's ``overrides`` string."""
    from hydra import compose, initialize_config_module

    from fedmed.config import register_configs

    register_configs()
    overrides = str(run_config.get("overrides", "")).split()
    with initialize_config_module(config_module="configs", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
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
    cfg, output_dir = config_from_run_config(dict(context.run_config))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("fedmed: writing outputs to %s; test split: dataset=%s (on this server)", output_dir, cfg.dataset.name)
    run_federation(grid, cfg, output_dir)
