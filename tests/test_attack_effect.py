"""Each attack, run against FedAvg in a small federation, does what it is for; a defence stops one.

The federations run in this process: the ClientApp's own train handler for every client and the
server's own aggregation path (stack_updates, the rule, apply_update), without Ray, so that all
of them fit in a test. Every run shares the honest rounds 1-3 (the attackers behave honestly
before ``attack.start_round``, so those rounds are the same whatever the attack) and branches at
round 4. The clean reference is the same federation with nobody attacking: the held-out backdoor
inputs are misread by it too, so the assertions are on the rise over it, with margin.

Model replacement is not among them: on these Adam-trained clients (honest update norms 17-21)
the scaled update of two colluders lands far from any trained model and wrecks the main task
(accuracy 0.40, ASR 0.03 measured) instead of planting the backdoor; it assumes honest updates
near zero, a converged model under SGD, as in experiments/backdoor_study.py, where it is run.
"""

from __future__ import annotations

import functools

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import train
from fedmed.data import load_config
from fedmed.job import JOB_KEY, Job, encode_job
from fedmed.models import build_model
from fedmed.packed_arrays import unpack
from fedmed.poisoning import backdoor_asr, backdoor_test_set, malicious_ids
from fedmed.serialization import load_arrays, model_to_arrays
from fedmed.train import evaluate
from strategies.aggregators import make_aggregator
from strategies.robust_aggregation import apply_update, batchnorm_statistics, stack_updates
from tests.helpers import compose_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity", "one_thread")]

NUM_CLIENTS = 5
HONEST_ROUNDS = 3  # the attack starts at round 4
ATTACK_ROUNDS = 3
CPU = torch.device("cpu")
# two of five clients, so that a blackbox poisoner is not simply out-voted in three rounds
BASE = (
    "dataset.n_train=1000",
    "dataset.n_val=100",
    "dataset.n_test=400",
    f"federation.num_clients={NUM_CLIENTS}",
    f"federation.clients_per_round={NUM_CLIENTS}",
    "client.batch_size=32",
    "client.augment=false",
    "seed=0",
    "device=cpu",  # the outcomes below are this numerics' (device=auto would train on a GPU if any)
)


# The edge-case attack (blackbox, PGD) is not among them: in a federation this small and short its
# effect does not hold over seeds (`python -m experiments.edge_case_seeds`, seeds 0-4: the ASR rise
# held on 1 of 5, FedMedian's ASR ranged 0.00-0.94; the README has the figures), so it is measured
# there, not asserted here, with this module's federations and ``EDGE``. tests/test_backdoor_federations.py
# runs edge-case replacement against Krum.
EDGE = ("attack=edge_case", "attack.source_class=0", "attack.target_class=1", "attack.tail_fraction=0.2")

# with an attack chosen: who attacks, and from when (attack=none has neither key)
ATTACKERS = ("attack.fraction=0.4", f"attack.start_round={HONEST_ROUNDS + 1}")


def job_for(*overrides: str) -> dict:
    attacking = any(o.startswith("attack=") and o != "attack=none" for o in overrides)
    job = Job.from_config(compose_config(*BASE, *(ATTACKERS if attacking else ()), *overrides))
    job.num_classes = 3
    return job


def client_update(job: dict, global_arrays: ArrayRecord, pid: int, server_round: int) -> ArrayRecord:
    content = RecordDict(
        {"arrays": global_arrays, "config": ConfigRecord({JOB_KEY: encode_job(job), "server-round": server_round})}
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS},
        state=RecordDict(),
        run_config={},
    )
    return unpack(train(Message(content, dst_node_id=7, message_type=MessageType.TRAIN), context).content["arrays"])


def run_rounds(job: dict, global_arrays: ArrayRecord, rounds: range, strategy: str = "fedavg") -> ArrayRecord:
    """Rounds over all clients, aggregated the way RobustAggregation does."""
    rule = make_aggregator(strategy)
    for server_round in rounds:
        replies = [client_update(job, global_arrays, pid, server_round) for pid in range(NUM_CLIENTS)]
        counts = torch.ones(NUM_CLIENTS)
        result = rule.aggregate(
            stack_updates(replies, global_arrays),
            counts,
            client_ids=list(range(NUM_CLIENTS)),
            generator=torch.Generator().manual_seed(server_round),
        )
        global_arrays = apply_update(
            global_arrays, result.update, result.noise, batchnorm_statistics(replies, counts, result.flagged)
        )
    return global_arrays


@functools.cache
def honest_phase(holds_out_tail: bool) -> ArrayRecord:
    """Rounds 1-3 from a seeded ResNet18, the same under every attack of one data layout: under
    ``attack=edge_case`` the source class's tail is held out from every client."""
    torch.manual_seed(0)
    start = model_to_arrays(build_model("resnet18", 3, 1))
    return run_rounds(job_for(*EDGE) if holds_out_tail else job_for(), start, range(1, HONEST_ROUNDS + 1))


@functools.cache
def final_model(attack: tuple[str, ...], strategy: str = "fedavg") -> torch.nn.Module:
    """The global model after the attack rounds (rounds 4-6), branched from the honest phase."""
    job = job_for(*attack)
    arrays = run_rounds(
        job,
        honest_phase(job.attack.name == "edge_case"),
        range(HONEST_ROUNDS + 1, HONEST_ROUNDS + ATTACK_ROUNDS + 1),
        strategy,
    )
    model = build_model("resnet18", 3, 1)
    load_arrays(model, arrays)
    return model


def clean_model(attack: tuple[str, ...]) -> torch.nn.Module:
    """The same federation and data, nobody attacking. Attackers train honestly before
    ``attack.start_round`` (a clean run of BadNets' setting, attack starting after the last round,
    equals ``attack=none``'s to the bit), so one clean run serves every attack that leaves the data
    as it is; the edge case holds the source class's tail out of every client, so it has its own."""
    if job_for(*attack).attack.name == "edge_case":
        return final_model((*attack, f"attack.start_round={HONEST_ROUNDS + ATTACK_ROUNDS + 1}"))
    return final_model(())


def accuracy(model: torch.nn.Module, attack: tuple[str, ...]) -> float:
    job = job_for(*attack)
    data = load_config(job.dataset, job.seed)
    return float(evaluate(model, data.test.images, data.test.labels, batch_size=128, device=CPU)["accuracy"])


def asr(model: torch.nn.Module, attack: tuple[str, ...]) -> float:
    job = job_for(*attack)
    data = load_config(job.dataset, job.seed)
    return backdoor_asr(model, backdoor_test_set(data, job.attack, job.seed), 128, CPU)


# Margins sit below what was measured here (seed 0, CPU, one thread, deterministic): ASR over the
# clean model's +0.44 (badnets), +0.64 (label_flip).
@pytest.mark.parametrize(
    "attack, margin",
    [
        (("attack=badnets", "attack.target_class=0"), 0.3),
        (("attack=label_flip", "attack.source_class=1", "attack.target_class=2"), 0.4),
    ],
)
def test_attack_against_fedavg_raises_asr_over_the_clean_model(attack, margin):
    assert len(malicious_ids(job_for(*attack).attack, NUM_CLIENTS, 0)) == 2
    clean = clean_model(attack)
    assert accuracy(clean, attack) > 0.45  # three classes: the honest federation has learned (0.52-0.55)
    clean_asr, attacked_asr = asr(clean, attack), asr(final_model(attack), attack)
    assert attacked_asr >= clean_asr + margin, (attacked_asr, clean_asr)


# measured: test accuracy 0.52 clean, 0.30 under sign_flip x3, 0.37 under gaussian noise
@pytest.mark.parametrize("attack", [("attack=sign_flip", "attack.scale=3.0"), ("attack=gaussian",)])
def test_untargeted_attack_against_fedavg_breaks_the_main_task(attack):
    clean_accuracy = accuracy(clean_model(attack), attack)
    attacked_accuracy = accuracy(final_model(attack), attack)
    assert attacked_accuracy <= clean_accuracy - 0.1, (attacked_accuracy, clean_accuracy)
