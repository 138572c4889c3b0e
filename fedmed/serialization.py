"""Model weights to and from Flower's ArrayRecord and to disk."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import save_file
from torch import nn


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` into ``model``; every key must be there with its shape (strict)."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def save_model(model: nn.Module, path: Path) -> Path:
    """Save the state dict as safetensors (contiguous CPU copies; shared storage is not allowed)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    return path


def load_model_file(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
