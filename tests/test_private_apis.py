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


def test_flowers_superexec_and_clientapp_runner_are_what_fedmed_warm_exec_calls():
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    assert hasattr(run_superexec, "get_executor") and hasattr(run_superexec, "run_superexec"), (
        "Flower's run_superexec module changed: fedmed/warm_exec.py replaces its get_executor"
    )
    expected = {"runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install"}
    missing = expected - set(parameters(run_clientapp))
    assert not missing, f"Flower's run_clientapp lost {sorted(missing)}: update fedmed/warm_exec.py's _child"


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


@pytest.mark.parametrize("name", ["cleanup"])
def test_opacus_releases_a_grad_sample_module_through_a_public_method(name):
    from opacus import GradSampleModule

    message = f"fedmed/defenses/privacy.py calls GradSampleModule.{name}()"
    assert callable(getattr(GradSampleModule, name, None)), message
