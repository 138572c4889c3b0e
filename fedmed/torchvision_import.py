"""Import torchvision without importing ``torch._dynamo`` (about 1.2 s of CPU in every process).

torchvision 0.29's ``ops/roi_align.py`` imports ``is_compile_supported`` from
``torch._dynamo.utils`` at module level, and ``import torchvision`` imports ``torchvision.ops``;
so every process that builds a model loads all of TorchDynamo although only ``roi_align``'s
compiled path, which fedmed never calls, uses it. The server, which builds and scores models but
trains none, is spared it (a process that trains loads TorchDynamo anyway: torch.optim's
optimizers import it on first use). torchvision means to avoid this: its ``lazy_compile`` in the
same file exists, its docstring says, to avoid "eagerly importing dynamo" (pytorch/vision#8436).

:func:`import_torchvision` gives ``roi_align`` a stand-in module for that one import: its
``is_compile_supported`` imports the real function on first call, and any other name asked of it
loads the real ``torch._dynamo.utils`` (today's cost, today's behaviour). The stand-in is removed
as soon as torchvision is imported, so ``torch.compile`` and everything else load the real
TorchDynamo when they need it. ``tests/test_private_apis.py`` checks that this still holds for
the pinned torchvision.
"""

from __future__ import annotations

import importlib
import sys
import types

_UTILS = "torch._dynamo.utils"


def _real_utils() -> types.ModuleType:
    if isinstance(sys.modules.get(_UTILS), _StandIn):
        del sys.modules[_UTILS]
    return importlib.import_module(_UTILS)


def is_compile_supported(device_type):
    return _real_utils().is_compile_supported(device_type)


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):  # `inspect` asks every module in sys.modules for `__file__`
            raise AttributeError(name)
        return getattr(_real_utils(), name)


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, with ``torch._dynamo`` left unloaded where it was not loaded yet."""
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        return importlib.import_module("torchvision")
    stand_in = _StandIn(_UTILS)
    stand_in.is_compile_supported = is_compile_supported
    sys.modules[_UTILS] = stand_in
    try:
        return importlib.import_module("torchvision")
    finally:
        if sys.modules.get(_UTILS) is stand_in:
            del sys.modules[_UTILS]
