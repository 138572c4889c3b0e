"""The job a client gets with every message: typed once on arrival, each section by its option's
structured config, so a wrong key or type is refused by name before any training."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedmed.config import ClientConfig, FaultConfig, PartitionConfig
from fedmed.defenses import DefenseConfig
from fedmed.job import JOB_KEY, Job, decode_job, encode_job
from fedmed.poisoning import AttackConfig
from tests.helpers import compose_config


def test_a_run_configuration_becomes_a_typed_job_and_survives_the_wire():
    cfg = compose_config(
        "attack=badnets",
        "attack.fraction=0.5",
        "defense=pgd_at",
        "defense.steps=2",
        "partition=dirichlet",
        "client.lr=0.05",
        "fault=[{kind: raise, partitions: [1], start_round: 2}]",
    )
    job = Job.from_config(cfg)
    assert isinstance(job.attack, AttackConfig) and job.attack.name == "badnets" and job.attack.fraction == 0.5
    assert isinstance(job.defense, DefenseConfig) and job.defense.steps == 2
    assert isinstance(job.client, ClientConfig) and job.client.lr == 0.05
    assert isinstance(job.partition, PartitionConfig) and job.partition.name == "dirichlet"
    assert job.fault == [FaultConfig(kind="raise", partitions=[1], start_round=2)]
    assert (job.seed, job.num_clients, job.rounds) == (cfg.seed, cfg.federation.num_clients, cfg.federation.rounds)
    assert job.dataset.name == cfg.dataset.name and job.dataset.n_train == cfg.dataset.n_train
    assert decode_job(encode_job(job)) == job
    assert json.loads(encode_job(job))["attack"]["fraction"] == 0.5  # plain JSON on the wire


def test_a_partial_job_takes_every_default():
    job = Job.from_plain({"seed": 3})
    assert job.seed == 3 and job.client == ClientConfig() and job.attack.name == "none" and job.defense.name == "none"
    assert job.dataset is None and job.round_size == job.num_clients


@pytest.mark.parametrize(
    "plain, message",
    [
        ({"seeds": 1}, r"the job has key 'seeds', which this fedmed does not know.*same version on both"),
        ({"client": {"learning_rate": 0.1}}, r"'client.learning_rate'"),
        ({"client": {"lr": "fast"}}, r"the job's client.lr: Value 'fast'"),
        ({"attack": {"name": "none", "fraction": 0.5}}, r"attack=none has no key attack.fraction"),
        ({"defense": {"name": "fgsm_at", "steps": 3}}, r"defense=fgsm_at has no key defense.steps"),
        ({"defense": {"name": "pgd_at", "steps": 0}}, r"defense.steps"),
        ({"dataset": {"name": "synthetic", "n_train": "many"}}, r"dataset.n_train"),
        ({"attack": {"name": "shadow"}}, r"attack='shadow' is not known"),
        ({"client": {"batch_size": 0}}, r"client.batch_size=0 must be >= 1"),
        ({"eval": {"every": 0}}, r"eval.every=0 must be >= 1"),
    ],
)
def test_a_wrong_key_or_value_is_refused_by_name(plain, message):
    with pytest.raises(ValueError, match=message):
        Job.from_plain(plain)


@pytest.mark.usefixtures("task_identity")
def test_a_client_refuses_a_job_it_cannot_read_before_it_loads_anything(monkeypatch):
    import clients.client_app as client_app

    loaded = []
    monkeypatch.setattr(client_app, "local_share", lambda *args: loaded.append(args))
    config = ConfigRecord({JOB_KEY: json.dumps({"client": {"lr": "fast"}}), "server-round": 1})
    message = Message(RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match=r"the job's client.lr: Value 'fast'"):
        client_app.train(message, context)
    assert loaded == []
