"""The Flower ClientApp: one hospital. Trains the global model on its local share and replies
with its weights, its example count and its own metrics."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.faults import active_fault, garbage_reply, misbehave
from clients.local_data import device_setting, is_simulated, local_share, partition_id, site_class_counts, site_name
from clients.local_training import LocalData, train_round
from clients.malicious import malicious_round
from fedmed.adversarial_eval import assess_robustness, fixed_subset
from fedmed.client_state import STATE_RECORD, records_of, restore_state, state_to_record
from fedmed.config import FaultConfig
from fedmed.defenses import model_norm_for
from fedmed.job import ASSESS_KEY, JOB_KEY, Job, decode_job
from fedmed.logs import through_flower_handlers, without_actor_end_notice
from fedmed.memory import return_free_memory
from fedmed.models import build_model
from fedmed.packed_arrays import pack, unpack
from fedmed.poisoning import attacks_now
from fedmed.precision import Precision
from fedmed.seeds import Stream, seed_for
from fedmed.serialization import load_arrays, model_to_arrays
from fedmed.shared_arrays import ARRAYS_FILE_KEY, arrays_file, read_arrays, reply_file_for, write_arrays
from fedmed.site_shift import apply_site_shift
from fedmed.train import evaluate, resolve_device

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _cached_model(
    name: str, freeze_backbone: bool, norm: str, assimilation: str, num_classes: int, in_channels: int
) -> torch.nn.Module:
    # A Ray worker plays many clients: build the architecture once; every call overwrites all
    # of its weights with the server's arrays. No ImageNet weights needed here for that reason.
    return build_model(
        name,
        num_classes,
        in_channels,
        pretrained=False,
        freeze_backbone=freeze_backbone,
        norm=norm,
        assimilation=assimilation,
    )


def _model_for(job: Job, num_classes: int, in_channels: int, arrays: ArrayRecord) -> torch.nn.Module:
    model_cfg = job.model
    norm = model_norm_for(model_cfg.norm, job.defense.name)
    model = _cached_model(
        model_cfg.name, model_cfg.freeze_backbone, norm, model_cfg.assimilation, num_classes, in_channels
    )
    load_arrays(model, arrays)
    return model


def _received_arrays(msg: Message, node_config: dict) -> ArrayRecord:
    """The global model: in the message, or (simulation on one machine) in the file it names."""
    path = arrays_file(msg.content["config"])
    if path is None:
        return unpack(msg.content["arrays"])
    if not is_simulated(node_config):
        raise ValueError(
            f"the server sent a file path ({path}) instead of the model; only simulated "
            "clients on the server's machine read those (ray.model_transport)"
        )
    return read_arrays(path)


def _arrays_reply(arrays: ArrayRecord, msg: Message) -> dict:
    """The reply's arrays, the way the global model came: in the message or in a file beside it."""
    path = arrays_file(msg.content["config"])
    if path is None:
        return {"arrays": pack(arrays)}
    reply_path = write_arrays(arrays, reply_file_for(path, msg))
    return {"arrays-file": ConfigRecord({ARRAYS_FILE_KEY: str(reply_path)})}


def _site_transform(share, seed: int, device: torch.device):
    if share.site_shift is None:
        return None
    generator = torch.Generator(device).manual_seed(seed_for(seed, Stream.SITE_NOISE))
    return lambda x: apply_site_shift(x, share.site_shift, generator)


SITE_RECORD = "site"


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    # in the processes Flower starts nothing configures logging: fedmed.logs
    through_flower_handlers()
    without_actor_end_notice()
    yield


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tells the server who this node is: its partition (simulation), or its site's name and
    examples per class (deployment; the labels are counted, no image leaves)."""
    if is_simulated(context.node_config):
        pid = partition_id(context.node_config, context.node_id)
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)
    content = RecordDict(
        {
            "metrics": MetricRecord({"class-counts": site_class_counts(context.node_config)}),
            SITE_RECORD: ConfigRecord({"name": site_name(context.node_config)}),
        }
    )
    return Message(content, reply_to=msg)


def _identity(node_config: dict, pid: int) -> dict:
    """A simulated client names its partition in its metrics; the server knows a site by its node."""
    return {"partition-id": pid} if is_simulated(node_config) else {}


def _injected_fault(job: Job, node_config: dict, pid: int, server_round: int, phase: str) -> FaultConfig | None:
    """The ``fault`` acting here now (simulated partitions only): raise and hang act at once (a
    finite hang then carries on as a slow client), garbage is for the caller to reply."""
    fault = active_fault(job.fault, pid, server_round, phase) if is_simulated(node_config) else None
    if fault is not None:
        misbehave(fault, pid, server_round)
    return fault


def _garbage_train_reply(msg: Message, node_config: dict, garbage: str, num_examples: int, pid: int) -> Message:
    arrays, count = garbage_reply(_received_arrays(msg, node_config), num_examples, garbage)
    metrics = MetricRecord({"num-examples": count, "partition-id": pid, "train_loss": 0.0})
    return Message(RecordDict({**_arrays_reply(arrays, msg), "metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config = msg.content["config"]
    job = decode_job(str(config[JOB_KEY]))
    server_round = int(config["server-round"])
    pid = partition_id(context.node_config, context.node_id)
    share = local_share(job, context.node_config)
    if STATE_RECORD in msg.content:  # the server's copy of this partition's state (after a resume, the only one)
        restore_state(context.state, records_of(msg.content[STATE_RECORD]))
    fault = _injected_fault(job, context.node_config, pid, server_round, "train")
    if fault is not None and fault.kind == "garbage":
        return _garbage_train_reply(msg, context.node_config, fault.garbage, len(share.train_indices), pid)
    device = resolve_device(device_setting(job, context.node_config))
    seed = seed_for(job.seed, Stream.CLIENT_ROUND, server_round, pid)
    model = _model_for(job, share.num_classes, share.images.shape[-1], _received_arrays(msg, context.node_config))
    # Seeded after the model: building it (only on a worker's first call) draws from the same
    # generator, and which call is a worker's first differs from run to run (and on resume).
    torch.manual_seed(seed_for(seed, Stream.TORCH_GLOBAL))
    data = LocalData(share.images, share.labels, share.train_indices, _site_transform(share, seed, device))
    job.attack.check(share.num_classes, job.num_clients)
    if is_simulated(context.node_config) and attacks_now(job.attack, pid, job.num_clients, job.seed, server_round):
        result = malicious_round(
            model, share, job, partition_id=pid, seed=seed, device=device, transform=data.transform
        )
    else:
        result = train_round(model, data, job, server_round=server_round, seed=seed, device=device, state=context.state)
    metrics = MetricRecord(
        {
            "num-examples": len(share.train_indices),
            **_identity(context.node_config, pid),
            **result,
            "train_time_s": time.perf_counter() - started,
        }
    )
    reply = RecordDict({**_arrays_reply(model_to_arrays(model), msg), "metrics": metrics})
    if is_simulated(context.node_config):
        reply[STATE_RECORD] = state_to_record(context.state)
    # a simulated worker plays client after client: what this round's training freed (autograd's
    # buffers, the optimizer's state) goes back to the OS instead of staying in its heap
    return_free_memory()
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """The global model on this client's held-out share (the weakest site matters in medicine),
    clean and, when the server asks for it, under the configured attacks."""
    config = msg.content["config"]
    job = decode_job(str(config[JOB_KEY]))
    server_round = int(config["server-round"])
    pid = partition_id(context.node_config, context.node_id)
    _injected_fault(job, context.node_config, pid, server_round, "evaluate")
    share = local_share(job, context.node_config)
    device = resolve_device(device_setting(job, context.node_config))
    metrics = {"num-examples": len(share.val_indices), **_identity(context.node_config, pid)}
    if len(share.val_indices) == 0:  # client.val_fraction=0: nothing held out to evaluate on
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    model = _model_for(job, share.num_classes, share.images.shape[-1], _received_arrays(msg, context.node_config))
    seed = seed_for(job.seed, Stream.CLIENT_EVALUATION, server_round, pid)
    eval_cfg = job.eval
    result = evaluate(
        model,
        share.images,
        share.labels,
        share.val_indices,
        batch_size=eval_cfg.batch_size,
        device=device,
        transform=_site_transform(share, seed, device),
        precision=Precision.of(job.client, device),
    )
    if bool(config.get(ASSESS_KEY, False)):
        indices = share.val_indices[
            fixed_subset(len(share.val_indices), eval_cfg.max_samples, seed_for(seed, Stream.EVALUATION_SUBSET))
        ]
        result.update(
            assess_robustness(
                model,
                share.images,
                share.labels,
                indices,
                attacks=list(eval_cfg.attacks),
                eps=list(eval_cfg.eps),
                batch_size=eval_cfg.batch_size,
                device=device,
                seed=seed,
                transform=_site_transform(share, seed, device),
            )
        )
    metrics.update({f"val_{k}": v for k, v in result.items() if v is not None})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
