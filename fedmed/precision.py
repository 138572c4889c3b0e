"""Mixed precision and memory layout of a client's local training and evaluation.

``client.amp``: ``off`` (float32), ``bf16`` or ``fp16`` autocast (``torch.autocast``) around the
forward passes of local training and of the clients' evaluation. ``fp16`` needs CUDA: its small
range needs loss scaling (``torch.amp.GradScaler``), which PyTorch provides for CUDA; on a CPU use
``bf16``. ``client.channels_last``: model and batches in the channels-last memory layout, which
convolutions on tensor cores (and oneDNN on CPUs) prefer. Both are off by default. The robustness
assessment's attacks always run in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(amp: str, channels_last: bool) -> None:
    """Refuse values that cannot work, naming the key."""
    if amp not in AMP_MODES:
        raise ValueError(f"client.amp={amp!r} is not known; use one of {', '.join(AMP_MODES)}")
    if not isinstance(channels_last, bool):
        raise ValueError(f"client.channels_last={channels_last!r} must be true or false")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``: the loss scaling of
    ``GradScaler.scale(loss)`` applied at the model's output, so that a training step that calls
    ``backward`` itself (a defence's loss) is scaled too."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


@dataclass
class Precision:
    """``client.amp`` and ``client.channels_last`` on ``device``."""

    amp: str = "off"
    channels_last: bool = False
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        check_precision(self.amp, self.channels_last)
        if self.amp == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"client.amp=fp16 needs a CUDA device (loss scaling), this client runs on "
                f"{self.device}; use client.amp=bf16 on a CPU"
            )

    @classmethod
    def of(cls, client, device: torch.device) -> Precision:
        """From a job's typed ``client`` section (``fedmed.config.ClientConfig``)."""
        return cls(client.amp, client.channels_last, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.amp])

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    @contextlib.contextmanager
    def training(self, model: nn.Module):
        """Around a training loop: yields ``optimizer_step(optimizer)`` to call instead of
        ``optimizer.step()``. With fp16, the gradients are scaled on their way back from the
        model's output and the step unscales them and skips steps whose gradients overflowed."""
        if self.amp != "fp16":
            yield lambda optimizer: optimizer.step()
            return
        scaler = torch.amp.GradScaler(self.device.type)
        scaler.scale(torch.ones((), device=self.device))  # creates the scale on the device
        hook = model.register_forward_hook(
            lambda module, inputs, output: _ScaleGradient.apply(output, scaler.get_scale())
        )

        def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
            scaler.step(optimizer)
            scaler.update()

        try:
            yield optimizer_step
        finally:
            hook.remove()
