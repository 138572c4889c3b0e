"""FLTrust's server update: the paper's ServerUpdate, as many iterations as a client, random batches."""

import numpy as np
import pytest
import torch
from torch import nn

from fedmed.dataset import Split
from fedmed.serialization import model_to_arrays
from strategies.robust_aggregation import update_size
from strategies.root_update import client_iterations, make_root_update, random_batches

CLIENT = {
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "epochs": 1,
    "batch_size": 16,
    "augment": False,
}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def root_split(n: int = 60) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, size=n))


def counted_steps(model: nn.Module) -> list[int]:
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return calls


def test_client_iterations_follow_the_median_client():
    # the median of (50, 100, 10000) is 100: ceil(100 / 32) = 4 batches an epoch, 2 epochs; the
    # client claiming 10000 examples does not drag the server along
    assert client_iterations(torch.tensor([50.0, 100.0, 10000.0]), epochs=2, batch_size=32) == 8
    assert client_iterations(torch.tensor([3.0]), epochs=1, batch_size=32) == 1
    with pytest.raises(ValueError, match="no client example counts"):
        client_iterations(torch.tensor([]), epochs=1, batch_size=32)


def test_random_batches_are_distinct_draws_from_the_root_indices():
    indices = np.arange(100, 140)
    batches = random_batches(indices, 5, 16, torch.Generator().manual_seed(0))
    assert len(batches) == 5
    for batch in batches:
        assert len(batch) == 16 and len(set(batch.tolist())) == 16 and set(batch.tolist()) <= set(indices.tolist())
    assert not all(np.array_equal(batches[0], b) for b in batches[1:])
    small = random_batches(np.arange(5), 2, 16, torch.Generator().manual_seed(0))
    assert [sorted(b.tolist()) for b in small] == [[0, 1, 2, 3, 4]] * 2


def test_the_server_takes_as_many_steps_as_the_median_client():
    model = tiny_model()
    global_arrays = model_to_arrays(model)
    reference_update = make_root_update(model, root_split(), 40, CLIENT, device=torch.device("cpu"), seed=0)
    calls = counted_steps(model)  # the hook travels with the server's deep copy
    update = reference_update(global_arrays, torch.tensor([64.0, 70.0, 500.0]))
    assert calls == [16] * 5  # ceil(70 / 16) = 5 iterations of full random batches
    assert update.shape == (update_size(global_arrays),) and float(update.norm()) > 0
    assert model_to_arrays(model)["0.weight"].numpy().tolist() == global_arrays["0.weight"].numpy().tolist()


def test_root_iterations_override_and_seeding():
    model = tiny_model()
    global_arrays = model_to_arrays(model)
    fixed = make_root_update(model, root_split(), 40, CLIENT, device=torch.device("cpu"), seed=0, iterations=3)
    calls = counted_steps(model)
    first = fixed(global_arrays, torch.tensor([640.0]))
    assert len(calls) == 3
    second = fixed(global_arrays, torch.tensor([640.0]))
    assert not torch.equal(first, second)  # fresh batches each round
    again = make_root_update(model, root_split(), 40, CLIENT, device=torch.device("cpu"), seed=0, iterations=3)
    assert torch.equal(again(global_arrays, torch.tensor([1.0])), first)  # same seed, same first round
    with pytest.raises(ValueError, match="strategy.root_iterations=0"):
        make_root_update(model, root_split(), 40, CLIENT, device=torch.device("cpu"), seed=0, iterations=0)
