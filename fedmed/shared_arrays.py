"""Model weights between the simulated server and its clients through files in shared memory.

In simulation Flower hands every message to a Ray actor: the driver pickles each message, the
whole model in it, into Ray's object store once per client, one after the other before the
round's clients can start, and every reply comes back the same way (ResNet18's 45 MB: 76 ms for
one ``ray.put`` and ``ray.get``, against 25 ms to write the model to ``/dev/shm`` here and 26 ms
to read it back). So when server and clients share a machine, ``fedmed-sim`` writes the round's
global ArrayRecord once to a file in a private directory of shared memory and sends only its path
(in the message's ConfigRecord, ``ARRAYS_FILE_KEY``); each client writes its reply's ArrayRecord
to a file beside it and replies with that path. The server reads each reply file back into an
ArrayRecord before the usual validation, then deletes it. On whole rounds
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
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Message

ARRAYS_FILE_KEY = "fedmed-arrays-file"
_SHARED_MEMORY = Path("/dev/shm")
_FORMAT = "fedmed-arrayrecord-1"
_PREFIX = "fedmed-arrays-"


def write_arrays(arrays: ArrayRecord, path: Path) -> Path:
    """Write ``arrays`` to ``path`` (via a temporary name, so a reader never sees half a file)."""
    entries = [[key, array.dtype, list(array.shape), array.stype, len(array.data)] for key, array in arrays.items()]
    header = json.dumps({"format": _FORMAT, "arrays": entries}).encode()
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        file.write(len(header).to_bytes(8, "little"))
        file.write(header)
        for array in arrays.values():
            file.write(array.data)
    os.replace(partial, path)
    return path


def read_arrays(path: Path) -> ArrayRecord:
    """The ArrayRecord ``write_arrays`` wrote to ``path``, keys in the same order. Each Array's
    bytes are read straight into it: one copy from the page cache, none more."""
    with open(path, "rb") as file:
        length = file.seek(0, os.SEEK_END)
        file.seek(0)
        try:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size)) if 0 < size < length else None
            if not isinstance(header, dict) or header.get("format") != _FORMAT:
                raise ValueError
        except ValueError:
            raise ValueError(f"{path} is not a fedmed arrays file") from None
        record = ArrayRecord()
        for key, dtype, shape, stype, nbytes in header["arrays"]:
            data = file.read(nbytes)
            if len(data) != nbytes:
                raise ValueError(f"{path} is truncated at array '{key}' ({len(data)} of {nbytes} bytes)")
            record[key] = Array(dtype=dtype, shape=tuple(int(s) for s in shape), stype=stype, data=data)
        if file.tell() != length:
            raise ValueError(f"{path} has {length - file.tell()} bytes after its last array")
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

    def collect(self, msg: Message) -> str | None:
        """Put the arrays of a reply that points to a file back into the reply, as the ArrayRecord
        ``"arrays"``, and delete the file. Returns why it could not, or None (also for replies that
        carry their arrays themselves, and for failed ones)."""
        if msg.has_error():
            return None
        for name, config in list(msg.content.config_records.items()):
            path = arrays_file(config)
            if path is None:
                continue
            if path.parent.resolve() != self.directory.resolve():
                return f"its arrays file {path} is outside the run's directory {self.directory}"
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
