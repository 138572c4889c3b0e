"""Model weights between the simulated server and its clients through files in shared memory.

In simulation Flower hands every message to a Ray actor: the driver pickles each message, the
whole model in it, into Ray's object store once per client, one after the other before the
round's clients can start, and every reply comes back the same way (ResNet18's 45 MB: 76 ms for
one ``ray.put`` and ``ray.get``, against 25 ms to write the model to ``/dev/shm`` here and 26 ms
to read it back). So when server and clients share a machine, ``fedmed-sim`` writes the round's
global ArrayRecord once to a file in a private directory of shared memory and sends only its path
(in the message's ConfigRecord, ``ARRAYS_FILE_KEY``); each client writes its reply's ArrayRecord
to a file beside it and replies with that path. FedAvg's server checks each reply file as it
comes in and then sums the files one Array at a time, freeing them as it reads
(``strategies.streamed``); robust rules read each back into an ArrayRecord (``collect``). The
round's model file goes once its training replies are in. On whole rounds
(``python -m experiments.bench_overhead --transport auto,message --repeats 3``) fedmed-sim took 1.022x
the bare PyTorch loop this way and 1.111x with the model in the messages. Deployed clients never
take this path: a client only accepts a file reference when it is a simulated partition.

A file has the layout of safetensors (8-byte header length, a JSON header, then the data; no code
runs on load) and holds each Array's own serialised bytes back to back, so an ArrayRecord comes
back byte for byte. Written by hand because safetensors itself wants typed tensors, which would
cost one more copy of the model on writing and two on reading.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message

ARRAYS_FILE_KEY = "fedmed-arrays-file"
_SHARED_MEMORY = Path("/dev/shm")
_FORMAT = "fedmed-arrayrecord-1"
_PREFIX = "fedmed-arrays-"


Entry = tuple[str, str, tuple[int, ...], str, int]  # key, dtype, shape, stype, number of bytes


def header_bytes(arrays: ArrayRecord) -> bytes:
    """The format's start for ``arrays``: the header's length (8 bytes) and the JSON header; the
    Arrays' own bytes follow it back to back."""
    entries = [[key, array.dtype, list(array.shape), array.stype, len(array.data)] for key, array in arrays.items()]
    header = json.dumps({"format": _FORMAT, "arrays": entries}).encode()
    return len(header).to_bytes(8, "little") + header


def parse_header(start: bytes, length: int) -> tuple[list[Entry], int]:
    """The entries of the header at the beginning of ``start`` (the data's first bytes, at least
    the header's, or all of it) in data of ``length`` bytes, and where the Arrays' bytes begin.
    ValueError when it is not one."""
    try:
        size = int.from_bytes(start[:8], "little")
        header = json.loads(start[8 : 8 + size]) if 0 < size < length and len(start) >= 8 + size else None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError
        entries = [
            (str(key), str(dtype), tuple(int(s) for s in shape), str(stype), int(nbytes))
            for key, dtype, shape, stype, nbytes in header["arrays"]
        ]
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a fedmed arrays file") from None
    if any(nbytes < 0 for *_, nbytes in entries):
        raise ValueError("not a fedmed arrays file")
    return entries, 8 + size


def write_arrays(arrays: ArrayRecord, path: Path) -> Path:
    """Write ``arrays`` to ``path`` (via a temporary name, so a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(header_bytes(arrays))
        for array in arrays.values():
            file.write(array.data)
    os.replace(partial, path)
    return path


class ArraysFile:
    """A file ``write_arrays`` wrote, read one Array at a time: its header (each Array's key,
    dtype and shape) on opening, the Arrays themselves by ``arrays``, as often as wanted.

    ValueError: on opening when the file is not a fedmed arrays file, from ``arrays`` when it is
    truncated or holds bytes after its last array (found when reading gets there). OSError when
    it cannot be read.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as file:
            length = file.seek(0, os.SEEK_END)
            file.seek(0)
            start = file.read(8)
            size = int.from_bytes(start, "little")
            start += file.read(size) if 0 < size < length else b""
        try:
            self.entries, self._start = parse_header(start, length)
        except ValueError:
            raise ValueError(f"{self.path} is not a fedmed arrays file") from None

    def layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(key, dtype, shape) of each Array, in the file's order."""
        return [(key, dtype, shape) for key, dtype, shape, _, _ in self.entries]

    def arrays(self) -> Iterator[tuple[str, Array]]:
        """(key, Array) in the file's order, each read when asked for: one Array in memory at a
        time, its bytes read straight into it (one copy from the page cache, none more)."""
        with open(self.path, "rb") as file:
            file.seek(self._start)
            for key, dtype, shape, stype, nbytes in self.entries:
                data = file.read(nbytes)
                if len(data) != nbytes:
                    raise ValueError(f"{self.path} is truncated at array '{key}' ({len(data)} of {nbytes} bytes)")
                yield key, Array(dtype=dtype, shape=shape, stype=stype, data=data)
            position = file.tell()
            end = file.seek(0, os.SEEK_END)
            if end != position:
                raise ValueError(f"{self.path} has {end - position} bytes after its last array")

    def consume(self) -> Iterator[tuple[str, Array]]:
        """(key, Array) from the last to the first, the file cut short behind each Array read:
        in shared memory its pages are freed as the reader's copy is made, so reading the file
        costs no memory (but reads it once only)."""
        ends = [self._start]
        for *_, nbytes in self.entries:
            ends.append(ends[-1] + nbytes)
        with open(self.path, "r+b") as file:
            length = file.seek(0, os.SEEK_END)
            if length < ends[-1]:
                raise ValueError(f"{self.path} is truncated ({length} of {ends[-1]} bytes)")
            if length > ends[-1]:
                raise ValueError(f"{self.path} has {length - ends[-1]} bytes after its last array")
            for (key, dtype, shape, stype, nbytes), start in zip(reversed(self.entries), reversed(ends[:-1])):
                file.seek(start)
                data = file.read(nbytes)
                if len(data) != nbytes:
                    raise ValueError(f"{self.path} is truncated at array '{key}' ({len(data)} of {nbytes} bytes)")
                file.truncate(start)
                yield key, Array(dtype=dtype, shape=shape, stype=stype, data=data)


def read_arrays(path: Path) -> ArrayRecord:
    """The ArrayRecord ``write_arrays`` wrote to ``path``, keys in the same order. Each Array's
    bytes are read straight into it: one copy from the page cache, none more."""
    record = ArrayRecord()
    for key, array in ArraysFile(path).arrays():
        record[key] = array
    return record


def arrays_file(config: ConfigRecord) -> Path | None:
    """The file a message's ConfigRecord points to, or None when its arrays travel in the message."""
    value = config.get(ARRAYS_FILE_KEY) if config is not None else None
    return Path(str(value)) if value else None


def shared_directory(needed_bytes: int) -> Path:
    """A new private directory in ``/dev/shm`` when it has room for ``needed_bytes``, else in the
    temporary directory (on disk, still in the page cache while a round runs). Directories left
    by runs that were killed (their process is gone) are removed first: shared memory is RAM."""
    parent = Path(tempfile.gettempdir())
    if _SHARED_MEMORY.is_dir() and os.access(_SHARED_MEMORY, os.W_OK):
        remove_orphans(_SHARED_MEMORY)
        if shutil.disk_usage(_SHARED_MEMORY).free > needed_bytes:
            parent = _SHARED_MEMORY
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=parent))


def remove_own_directories(pid: int | None = None) -> None:
    """Remove the directories of this process (``pid``) in shared memory and the temporary
    directory: what an interrupted run leaves when its ServerApp thread cannot close them."""
    pid = os.getpid() if pid is None else pid
    for parent in (_SHARED_MEMORY, Path(tempfile.gettempdir())):
        for directory in parent.glob(f"{_PREFIX}{pid}-*"):
            shutil.rmtree(directory, ignore_errors=True)


def remove_orphans(parent: Path) -> list[Path]:
    """Remove ``parent``'s directories of fedmed runs whose process no longer exists."""
    removed = []
    for directory in parent.glob(f"{_PREFIX}*-*"):
        pid = directory.name[len(_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class SharedArrays:
    """The server's side: publishes global models, collects reply files, removes them all on close.

    Parameters
    ----------
    directory : Path
        Where the files go (``shared_directory``); removed with everything in it by ``close``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._published: tuple[ArrayRecord, Path] | None = None

    def publish(self, arrays: ArrayRecord) -> Path:
        """The file holding ``arrays``: written on the first call for this record, and the
        previous round's file removed (training and evaluation of a round share one file)."""
        if self._published is not None and self._published[0] is arrays:
            return self._published[1]
        path = write_arrays(arrays, self.directory / f"global-{uuid.uuid4().hex}.bin")
        if self._published is not None:
            self._published[1].unlink(missing_ok=True)
        self._published = (arrays, path)
        return path

    def unpublish(self) -> None:
        """Remove the published model's file now (the next ``publish`` writes one again): once a
        round's training replies are in, its clients are done with it, and its shared memory is
        better free while the server sums the replies (a client that missed the round's deadline
        and reads it only now fails, as it would have anyway)."""
        if self._published is not None:
            self._published[1].unlink(missing_ok=True)
            self._published = None

    def reply_files(self, msg: Message) -> list[tuple[str, Path]]:
        """(ConfigRecord name, path) of each arrays file a reply points to; none for a failed
        reply or one that carries its arrays itself."""
        if msg.has_error():
            return []
        found = ((name, arrays_file(config)) for name, config in msg.content.config_records.items())
        return [(name, path) for name, path in found if path is not None]

    def owns(self, path: Path) -> bool:
        """Whether ``path`` is in the run's directory (only such files are read and deleted)."""
        return path.parent.resolve() == self.directory.resolve()

    def outside_problem(self, path: Path) -> str:
        return f"its arrays file {path} is outside the run's directory {self.directory}"

    def collect(self, msg: Message) -> str | None:
        """Put the arrays of a reply that points to a file back into the reply, as the ArrayRecord
        ``"arrays"``, and delete the file. Returns why it could not, or None (also for replies that
        carry their arrays themselves, and for failed ones)."""
        for name, path in self.reply_files(msg):
            if not self.owns(path):
                return self.outside_problem(path)
            try:
                record = read_arrays(path)
            except (OSError, ValueError, KeyError) as error:
                return f"its arrays file {path} could not be read: {error}"
            finally:
                path.unlink(missing_ok=True)
            del msg.content[name]
            msg.content["arrays"] = record
        return None

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self._published = None


def reply_file_for(global_file: Path, msg: Message) -> Path:
    """Where a client writes its reply's arrays: beside the global model, named by the message."""
    return global_file.parent / f"reply-{msg.metadata.message_id}.bin"
