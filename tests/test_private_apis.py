"""The few private interfaces of pinned libraries fedmed relies on, each in one module, each
checked here so that an upgrade that changes one fails with a message naming the module to
follow, instead of failing somewhere inside a run (or, worse, silently doing nothing).

Where each is used and why there is no public one is written in docs/architecture.md
("Private interfaces").
"""

from __future__ import annotations

import inspect

import pytest


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_flowers_simulation_queue_filler_is_where_fedmed_simulation_replaces_it():
    from flwr.server.superlink.fleet.vce import vce_api

    from fedmed.simulation import add_pending_messages_to_queue

    assert hasattr(vce_api, "add_messages_to_queue"), (
        "Flower no longer has vce_api.add_messages_to_queue: fedmed/simulation.py's "
        "pending_messages_only must follow the new simulation runtime"
    )
    assert parameters(vce_api.add_messages_to_queue) == parameters(add_pending_messages_to_queue), (
        "Flower changed vce_api.add_messages_to_queue's parameters: update fedmed/simulation.py"
    )


def test_flowers_simulation_workers_stop_when_fedmed_wakes_them():
    """fedmed/simulation.py replaces Flower's reply poller and wakes its workers with an item whose
    ``metadata`` raises ``queue.Empty``; Flower's worker must take that as its poll timing out."""
    import threading
    import time
    from queue import Queue

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    from fedmed.simulation import _StopWaiting, put_replies_into_state

    assert hasattr(vce_api, "put_message_into_state") and hasattr(vce_api, "worker"), (
        "Flower's simulation runtime changed: fedmed/simulation.py's pending_messages_only must follow it"
    )
    assert parameters(vce_api.put_message_into_state) == parameters(put_replies_into_state), (
        "Flower changed vce_api.put_message_into_state's parameters: update fedmed/simulation.py"
    )
    queue, replies, stop = Queue(), Queue(), threading.Event()
    workers = [
        threading.Thread(target=vce_api.worker, args=(queue, replies, {}, None, stop, VceMetrics()), daemon=True)
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    time.sleep(0.05)  # each is waiting in queue.get(timeout=1.0)
    stop.set()
    queue.put(_StopWaiting(queue))
    for worker in workers:
        worker.join(timeout=0.6)  # Flower's own timeout is 1 s
    assert not any(worker.is_alive() for worker in workers), (
        "Flower's simulation worker no longer stops on fedmed/simulation.py's _StopWaiting"
    )
    assert replies.empty()  # nothing was handed on as a message or an error reply


def test_flowers_superexec_and_clientapp_runner_are_what_fedmed_warm_exec_calls():
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    assert hasattr(run_superexec, "get_executor") and hasattr(run_superexec, "run_superexec"), (
        "Flower's run_superexec module changed: fedmed/warm_exec.py replaces its get_executor"
    )
    expected = {"runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install"}
    missing = expected - set(parameters(run_clientapp))
    assert not missing, f"Flower's run_clientapp lost {sorted(missing)}: update fedmed/warm_exec.py's _child"


def test_flowers_supernode_loop_sleeps_where_fedmed_supernode_caps_it():
    import importlib
    import time

    from flwr.supernode import start_client_internal

    flower_supernode = importlib.import_module("flwr.supernode.cli.flower_supernode")

    source = inspect.getsource(start_client_internal)
    assert start_client_internal.time is time and "time.sleep(3)" in source and "time.sleep(0.5)" in source, (
        "Flower's SuperNode loop no longer waits with time.sleep(3) / time.sleep(0.5) through the time "
        "module: fedmed/flower_waits.py's cap_supernode_sleeps must follow it"
    )
    assert callable(getattr(flower_supernode, "flower_supernode", None)), (
        "Flower moved flower_supernode: update fedmed/supernode.py's main"
    )


def test_flowers_object_pulls_are_where_fedmed_shortens_their_backoff():
    import importlib

    from flwr.supercore.inflatable import inflatable_utils

    from fedmed.flower_waits import CLIENTAPP_PULLS, SERVERAPP_PULLS, SUPERNODE_PULLS

    expected = {"initial_backoff", "backoff_cap"}
    assert expected <= set(parameters(inflatable_utils.pull_objects)), (
        "Flower's pull_objects lost initial_backoff/backoff_cap: update fedmed/flower_waits.py"
    )
    for name in (CLIENTAPP_PULLS, SUPERNODE_PULLS, SERVERAPP_PULLS):
        module = importlib.import_module(name)
        assert getattr(module, "pull_objects", None) is not None, (
            f"{name} no longer calls pull_objects by that name: update fedmed/flower_waits.py"
        )


def test_the_short_backoff_changes_only_the_waits():
    from fedmed.flower_waits import with_short_backoff

    calls = []
    pull = with_short_backoff(lambda ids, fn, **kwargs: calls.append(kwargs) or {}, 0.05, 0.5)
    pull(["a"], None, initial_backoff=1, backoff_cap=10, max_time=60)
    pull(["a"], None)
    assert calls == [
        {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_time": 60},
        {"initial_backoff": 0.05, "backoff_cap": 0.5},
    ]
    assert with_short_backoff(pull, 0.05, 0.5) is pull  # applied once


def test_fedmed_supernode_caps_only_the_waits():
    from fedmed.flower_waits import CappedSleeps
    from fedmed.supernode import parse_args

    slept = []
    clock = CappedSleeps(0.2, sleep=slept.append)
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(0.05)
    assert slept == [0.2, 0.2, 0.05]
    assert clock.monotonic() > 0  # the rest of the time module unchanged
    args, rest = parse_args(["--poll-interval", "0.5", "--insecure", "--superlink", "127.0.0.1:9092"])
    assert args.poll_interval == 0.5 and rest == ["--insecure", "--superlink", "127.0.0.1:9092"]
    with pytest.raises(SystemExit):
        parse_args(["--poll-interval", "0"])
    assert parse_args([])[0].heartbeat_interval == 30  # Flower's own
    assert parse_args(["--heartbeat-interval", "10"])[0].heartbeat_interval == 10
    with pytest.raises(SystemExit):
        parse_args(["--heartbeat-interval", "5"])  # the SuperLink refuses under 10 s


def test_flowers_supernode_reports_and_sends_the_heartbeat_fedmed_supernode_sets(monkeypatch):
    import importlib

    from flwr.common import constant

    from fedmed.flower_waits import HEARTBEAT_USERS, set_heartbeat_interval

    for name in HEARTBEAT_USERS:
        module = importlib.import_module(name)
        assert module.HEARTBEAT_DEFAULT_INTERVAL == constant.HEARTBEAT_DEFAULT_INTERVAL, (
            f"{name} no longer reads Flower's HEARTBEAT_DEFAULT_INTERVAL: update fedmed/flower_waits.py"
        )
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    assert (constant.HEARTBEAT_MIN_INTERVAL, constant.HEARTBEAT_MAX_INTERVAL) == (10, 1800), (
        "update fedmed/supernode.py's HEARTBEAT_RANGE_S"
    )
    set_heartbeat_interval(10.0)
    assert [importlib.import_module(n).HEARTBEAT_DEFAULT_INTERVAL for n in HEARTBEAT_USERS] == [10.0, 10.0]


def test_flowers_client_actor_class_is_the_one_fedmed_stopping_ends():
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    from fedmed.stopping import CLIENT_ACTOR

    # release_client_actors finds the handles by this name in their repr
    assert f"ActorClass({CLIENT_ACTOR})" in repr(ClientAppActor), "update fedmed/stopping.py's CLIENT_ACTOR"


def test_torchvisions_densenet_loader_still_renames_old_checkpoint_keys():
    from torchvision.models import densenet

    assert hasattr(densenet, "_load_state_dict"), (
        "torchvision dropped densenet._load_state_dict: fedmed/models.py's _load_into must rename "
        "the old checkpoint keys ('norm.1' -> 'norm1') itself"
    )
    assert parameters(densenet._load_state_dict)[:2] == ["model", "weights"]


def test_rays_message_from_a_thread_is_the_one_fedmed_ray_start_drops():
    import ray._private.worker as worker

    from fedmed.ray_start import _NOT_MAIN_THREAD

    assert _NOT_MAIN_THREAD in inspect.getsource(worker), (
        "Ray reworded the warning ray.init gives off the main thread: update fedmed/ray_start.py"
    )


def test_rays_node_lists_the_autoscaler_monitor_fedmed_ray_start_stops():
    from ray._private import node, ray_constants, worker

    assert hasattr(worker, "_global_node") and ray_constants.PROCESS_TYPE_MONITOR == "monitor", (
        "Ray moved its node object or renamed the monitor process: update fedmed/ray_start.py's stop_autoscaler_monitor"
    )
    source = inspect.getsource(node.Node)
    assert "self.all_processes[ray_constants.PROCESS_TYPE_MONITOR]" in source, (
        "Ray's Node no longer records the monitor in all_processes: update fedmed/ray_start.py"
    )


@pytest.mark.parametrize("name", ["cleanup"])
def test_opacus_releases_a_grad_sample_module_through_a_public_method(name):
    from opacus import GradSampleModule

    message = f"fedmed/defenses/privacy.py calls GradSampleModule.{name}()"
    assert callable(getattr(GradSampleModule, name, None)), message


def test_torchvision_loads_without_torchdynamo_and_roi_align_still_asks_the_real_check():
    """fedmed/torchvision_import.py: in a fresh interpreter, building on fedmed.models leaves
    TorchDynamo unloaded; roi_align's `is_compile_supported` gives the real answer; torch.compile's
    module loads for real afterwards."""
    import subprocess
    import sys

    script = """
import sys
import fedmed.models
assert "torch._dynamo" not in sys.modules, "torch._dynamo loaded by importing fedmed.models"
source = open(sys.modules["torchvision.ops.roi_align"].__file__).read()
assert "from torch._dynamo.utils import is_compile_supported" in source, "TORCHVISION_CHANGED"
stand_in_answer = sys.modules["torchvision.ops.roi_align"].is_compile_supported("cpu")
from torch._dynamo.utils import is_compile_supported
assert type(sys.modules["torch._dynamo.utils"]).__name__ == "module", "the stand-in was left in sys.modules"
assert stand_in_answer == is_compile_supported("cpu"), (stand_in_answer, is_compile_supported("cpu"))
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "TORCHVISION_CHANGED" not in result.stderr, (
        "torchvision no longer imports torch._dynamo.utils in ops/roi_align.py: "
        "fedmed/torchvision_import.py may be removed (import torchvision directly)"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
