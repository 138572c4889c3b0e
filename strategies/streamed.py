"""FedAvg's weighted sum over replies read, checked and added one at a time.

In simulation each reply's weights wait in a file in shared memory (``fedmed.shared_arrays``).
Loading all of a round's replies into the server before checking and averaging them held ten
models at once in the driver (0.75 GiB more for ResNet18), and its allocator kept that memory
for the rest of the run. Here a reply's Arrays are read one at a time from its file, checked
(``strategies.replies.array_problem``) and added into a running sum, then dropped: the server
holds the sum and one Array.

The result is Flower's ``aggregate_arrayrecords`` bit for bit: the same factors ``w / total``
(Python floats, ``total`` the plain ``sum`` of the accepted replies' counts), the same products
``values * factor`` in each reply's own dtype and the same in-place additions in the same order,
element by element. An unnormalised running sum of ``count * values`` divided by the total at
the end would not be exact: ``v * (w / T)`` and ``(v * w) / T`` round differently. So the total
must be known before the first product, and it depends on which replies pass the checks, which
needs their values. Hence:

* in simulation the round loop hands each reply to ``FedMedStrategy.reply_arrived`` as it comes
  in, while other clients still train, which checks its file (read one Array at a time). With
  every reply checked the sum cannot fail, so it reads each file once more and cuts it short
  behind each Array it has read (``ArraysFile.consume``): the files' shared memory is freed as
  fast as the sum fills, and the sum costs no memory of its own at the round's peak;
* otherwise (replies in the messages, or not checked on arrival) the sum is optimistic: it
  starts with the total of every reply whose small parts (failure, records, example count,
  keys, shapes, dtypes) are fine and checks values while adding; when a reply fails, it is
  rejected and the sum starts again with the new total, after checking every other reply's
  values first, so at most once more. The files stay until the sum is done.

A reply file could in principle change between its check on arrival and the sum; only the
simulation's own clients on this machine write there (deployed clients never use files), and a
sum that meets a failure after consuming files leaves the round without an aggregate.
Robust aggregators need all updates stacked and do not come here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedmed.packed_arrays import unpack_reply
from fedmed.serialization import array_view
from fedmed.shared_arrays import ArraysFile, SharedArrays
from strategies.replies import array_problem, content_problem, layout_problem

_READ_ERRORS = (OSError, ValueError, KeyError)


class ReplyArrays:
    """A reply's Arrays, handed out one at a time: from its ArrayRecord, or read from its file."""

    def __init__(self, record: ArrayRecord | None = None, file: ArraysFile | None = None) -> None:
        assert (record is None) != (file is None)
        self.record = record
        self.file = file

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        if self.file is not None:
            return self.file.layout()
        return [(key, array.dtype, tuple(array.shape)) for key, array in self.record.items()]

    def arrays(self, consume: bool = False) -> Iterator[tuple[str, Array]]:
        """The Arrays one at a time; ``consume``: a file is freed as it is read, and read once only."""
        if self.file is not None:
            yield from self.file.consume() if consume else self.file.arrays()
        else:
            yield from self.record.items()

    def read_problem(self, error: Exception) -> str:
        return f"its arrays file {self.file.path if self.file else '?'} could not be read: {error}"


@dataclass
class Candidate:
    """A reply whose small parts passed the checks; ``checked`` once its values have too."""

    pid: int | None
    msg: Message
    source: ReplyArrays
    files: list[Path] = field(default_factory=list)
    checked: bool = False

    def release(self) -> None:
        """Delete the reply's files in the run's directory (shared memory is RAM)."""
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []


def open_reply(
    msg: Message, shared: SharedArrays | None, global_arrays: ArrayRecord
) -> tuple[ReplyArrays | None, str | None, list[Path]]:
    """The reply's arrays, unread but for a file's header, or why the reply cannot be aggregated
    as far as that shows; and the files in the run's directory it points to (to delete once
    done, whatever the outcome; files elsewhere are never touched)."""
    if msg.has_error():
        return None, content_problem(msg, 1), []
    problem = unpack_reply(msg)
    if problem is not None:
        return None, problem, []
    files = shared.reply_files(msg) if shared is not None else []
    owned = [path for _, path in files if shared.owns(path)]
    outside = [path for _, path in files if not shared.owns(path)]
    if outside:
        return None, shared.outside_problem(outside[0]), owned
    source = None
    if len(files) == 1:
        try:
            source = ReplyArrays(file=ArraysFile(files[0][1]))
        except _READ_ERRORS as error:
            return None, f"its arrays file {files[0][1]} could not be read: {error}", owned
    problem = content_problem(msg, len(msg.content.array_records) + len(files))
    if problem is not None:
        return None, problem, owned
    if source is None:
        source = ReplyArrays(record=next(iter(msg.content.array_records.values())))
    return source, layout_problem(source.layout(), global_arrays), owned


def values_problem_of(candidate: Candidate) -> str | None:
    """Why the candidate's values cannot be aggregated, reading one Array at a time, or None."""
    try:
        with contextlib.closing(candidate.source.arrays()) as arrays:
            for key, array in arrays:
                problem = array_problem(key, array)
                if problem is not None:
                    return problem
    except _READ_ERRORS as error:
        return candidate.source.read_problem(error)
    candidate.checked = True
    return None


def weighted_sum(
    candidates: list[Candidate], factors: list[float], consume: bool = False
) -> tuple[dict[str, np.ndarray] | None, tuple[Candidate, str] | None]:
    """``sum_i factors[i] * arrays_i`` as Flower's ``aggregate_arrayrecords`` computes it (keys
    in the first candidate's order), reading each candidate's Arrays one at a time and checking
    the values of those not yet ``checked``. Returns the sum and None, or None and the first
    candidate that failed with why. ``consume``: the files are freed as they are read
    (``ArraysFile.consume``), so that they cannot be read again."""
    total: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for candidate, factor in zip(candidates, factors, strict=True):
        try:
            with contextlib.closing(candidate.source.arrays(consume)) as arrays:
                for key, array in arrays:
                    if not candidate.checked:
                        problem = array_problem(key, array)
                        if problem is not None:
                            return None, (candidate, problem)
                    # Flower: value.numpy() * weight, then += in place (numpy's rules give the
                    # same dtypes: float32 stays float32, integer counters become float64)
                    product = array_view(array) * factor
                    if key in total:
                        total[key] += product
                    else:
                        total[key] = product
                        shapes[key] = tuple(int(s) for s in array.shape)
                    del array, product
        except _READ_ERRORS as error:
            return None, (candidate, candidate.source.read_problem(error))
        candidate.checked = True
    order = [key for key, _, _ in candidates[0].source.layout()] if candidates else []
    return {key: total[key].reshape(shapes[key]) for key in order}, None
