"""client.amp and client.channels_last: checked with messages naming the key, and a tiny local
training and evaluation on the CPU (no Ray) gives finite results that differ from float32 where
autocast is on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmed.config import check_client
from fedmed.models import build_model
from fedmed.precision import Precision
from fedmed.synthetic import make_synthetic
from fedmed.train import evaluate, make_optimizer, train_local

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def client_section(**overrides):
    from fedmed.config import ClientConfig

    return ClientConfig(**overrides)


def test_bad_values_name_the_key():
    check_client(client_section())  # the defaults pass
    with pytest.raises(ValueError, match=r"client\.amp='half'"):
        check_client(client_section(amp="half"))
    with pytest.raises(ValueError, match=r"client\.channels_last"):
        check_client(client_section(channels_last="yes"))
    with pytest.raises(ValueError, match=r"client\.amp=fp16 needs a CUDA device.*client\.amp=bf16"):
        check_client(client_section(amp="fp16"), device="cpu")
    with pytest.raises(ValueError, match=r"client\.amp=fp16 needs a CUDA device"):
        Precision("fp16", False, CPU)


def run(precision: Precision, n_train: int = 48) -> tuple[dict, dict, dict]:
    data = make_synthetic(num_classes=2, channels=1, size=28, n_train=n_train, n_val=0, n_test=24, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1, norm="batch")
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = make_optimizer(model.parameters(), "sgd", 0.01, 0.0, 0.0)
    trained = train_local(
        model,
        data.train.images,
        data.train.labels,
        np.arange(n_train),
        epochs=1,
        batch_size=16,
        optimizer=optimizer,
        device=CPU,
        seed=0,
        precision=precision,
    )
    scores = evaluate(model, data.test.images, data.test.labels, batch_size=24, device=CPU, precision=precision)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = torch.cat([(weights[k] - initial[k]).flatten() for k in initial])
    return trained, scores, weights, update


@pytest.mark.parametrize("amp, channels_last", [("bf16", False), ("off", True), ("bf16", True)])
def test_local_training_and_evaluation_are_finite(amp, channels_last):
    reference = run(Precision(device=CPU))
    trained, scores, weights, update = run(Precision(amp, channels_last, CPU))
    assert trained["steps"] == 3
    assert np.isfinite(trained["loss"]) and 0 <= trained["accuracy"] <= 1
    assert np.isfinite(scores["loss"]) and 0 <= scores["accuracy"] <= 1
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    changed = any(not torch.equal(w, reference[2][k]) for k, w in weights.items() if w.is_floating_point())
    if amp == "bf16":  # autocast really ran: bfloat16 arithmetic gives other weights than float32
        assert changed and trained["loss"] != reference[0]["loss"]
    else:  # only the memory layout changed: the same training step, up to the convolutions' rounding
        # (one step: over several, a randomly initialised ResNet with BatchNorm on batches of 16
        # amplifies that rounding, to an update cosine of 0.77 after 3 steps for some batch orders)
        first, _, _, first_update = run(Precision(device=CPU), n_train=16)
        step, _, _, step_update = run(Precision(amp, channels_last, CPU), n_train=16)
        assert step["loss"] == pytest.approx(first["loss"], rel=1e-4)
        assert torch.nn.functional.cosine_similarity(step_update, first_update, dim=0) > 0.999
    if channels_last:
        conv = next(w for w in weights.values() if w.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last)


def test_fp16_scales_the_gradients_on_their_way_back():
    """The fp16 loss scaling, exercised without CUDA: the hook multiplies the gradient by the
    scale, so the gradients before unscaling are the float32 ones times the scale."""
    from fedmed.precision import _ScaleGradient

    x = torch.randn(4, 3, requires_grad=True)
    _ScaleGradient.apply(x * 2.0, 1024.0).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 2048.0))
