"""Model weights to and from Flower's ArrayRecord and to disk."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from safetensors.torch import save_file
from torch import nn


def array_from_numpy(values: np.ndarray) -> Array:
    """``Array(values)``, byte for byte, three times faster.

    Flower's ``Array.from_numpy_ndarray`` runs ``np.save`` into a growing ``BytesIO``: 51 ms for
    ResNet18's state dict against 18 ms for the .npy header written once plus the raw bytes.
    The values are copied once, straight behind the header. Anything but a C-contiguous array
    takes Flower's path.
    """
    if not values.flags.c_contiguous or values.dtype.hasobject:
        return Array(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    return Array(
        dtype=str(values.dtype),
        shape=tuple(int(s) for s in values.shape),
        stype=SType.NUMPY,
        data=b"".join((header.getvalue(), values)),
    )


def array_view(array: Array) -> np.ndarray:
    """The array's values as a read-only, flat numpy view of its serialised bytes (no copy).

    Flower stores an ``Array`` as an .npy file; its values are the last ``nbytes`` bytes. Reading
    them in place instead of ``Array.numpy()`` (``np.load``: parse the header, copy into fresh
    memory) halved the time to stack the updates. Anything but a C-ordered .npy falls back to
    ``Array.numpy()``.
    """
    dtype = np.dtype(array.dtype)
    count = int(np.prod(array.shape, dtype=np.int64))
    data = array.data
    offset = len(data) - count * dtype.itemsize
    if array.stype != SType.NUMPY or dtype.hasobject or offset < 10 or b"'fortran_order': False" not in data[:offset]:
        return np.ascontiguousarray(array.numpy()).reshape(-1)
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({k: array_from_numpy(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` into ``model``; every key must be there with its shape (strict).

    The tensors are views of the arrays' bytes (``array_view``), which ``load_state_dict`` only
    reads: one copy instead of ``ArrayRecord.to_torch_state_dict``'s two.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {key: torch.from_numpy(array_view(array)).reshape(tuple(array.shape)) for key, array in arrays.items()}
    model.load_state_dict(state, strict=True)


def save_model(model: nn.Module, path: Path) -> Path:
    """Save the state dict as safetensors (contiguous CPU copies; shared storage is not allowed)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    return path


def load_model_file(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
