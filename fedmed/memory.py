"""Give the C heap's free pages back to the operating system between the server's rounds.

glibc's malloc keeps memory a process has freed for its next allocations instead of returning
it: a large block freed below the top of a heap, or in a thread's own arena (the ServerApp runs
in a thread), stays resident. The server allocates and frees tens of MB a round (evaluating the
global model, summing the replies, serialising the new model), so without this its resident
memory ratchets up round after round. ``malloc_trim(0)`` returns every whole free page of every
arena (``madvise(MADV_DONTNEED)``); elsewhere than glibc it is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_free_memory() -> bool:
    """Return the heap's free pages to the OS; True when that was possible (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
