"""The clients' optimizers use torch's fused kernels where torch has them, and step as torch's
default implementation does."""

import copy

import pytest
import torch
import torch.nn.functional as F

from experiments.bench_optimizer import unfused
from fedmed.models import build_model
from fedmed.train import make_optimizer


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_cpu_optimizers_are_fused_and_step_like_torchs_default(name, one_thread):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1)
    reference = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters(), name, 1e-2, 0.9, 5e-4)
    assert optimizer.defaults["fused"] is True
    plain = unfused(optimizer, reference.parameters())
    x, y = torch.rand(8, 1, 28, 28), torch.tensor([0, 1] * 4)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    moved = [(p - q).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())]
    assert max(moved) < 1e-4, max(moved)
    # the models did train: the comparison is not between two untouched copies
    assert any(
        (p - q).abs().max() > 1e-3 for p, q in zip(model.parameters(), build_model("resnet18", 2, 1).parameters())
    )


def test_devices_without_fused_kernels_get_torchs_default():
    weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"))
    assert make_optimizer([weight], "adam", 1e-3).defaults["fused"] is None


def test_frozen_parameters_are_left_out():
    frozen, trained = torch.nn.Parameter(torch.zeros(2), requires_grad=False), torch.nn.Parameter(torch.zeros(2))
    assert make_optimizer([frozen, trained], "sgd", 0.1).param_groups[0]["params"] == [trained]
