"""Model weights between the simulated server and its clients through files in shared memory.

In simulation Flower hands every message to a Ray actor: the driver pickles the message, with the
whole model in it, into Ray's object store once per client, and every reply comes back the same
way. For ResNet18 (45 MB) one put and get measured about 230 ms here, against 45 ms to write the
model once to ``/dev/shm`` and 11 ms to read it (``experiments/bench_overhead.py`` has the round
times). So when server and clients share a machine, ``fedmed-sim`` writes the round's global
ArrayRecord once to a file in a private directory of shared memory and sends only its path (in the
message's ConfigRecord, ``ARRAYS_FILE_KEY``); each client writes its reply's ArrayRecord to a file
beside it and replies with that path. The server reads each reply file back into an ArrayRecord
before the usual validation, then deletes it. Deployed clients never take this path: a client
only accepts a file reference when it is a simulated partition.

The files are safetensors (no code runs on load): each Array's serialised bytes as a uint8 tensor,
its dtype, shape and stype in the metadata, so an ArrayRecord comes back byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from safetensors import safe_open
from safetensors.numpy import save_file

ARRAYS_FILE_KEY = "fedmed-arrays-file"
_SHARED_MEMORY = Path("/dev/shm")
_FORMAT = "fedmed-arrayrecord-1"


def write_arrays(arrays: ArrayRecord, path: Path) -> Path:
    """Write ``arrays`` to ``path`` (via a temporary name, so a reader never sees half a file)."""
    tensors, layout = {}, {}
    for key, array in arrays.items():
        tensors[key] = np.frombuffer(array.data, dtype=np.uint8)
        layout[key] = [array.dtype, list(array.shape), array.stype]
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": _FORMAT, "layout": json.dumps(layout)})
    os.replace(partial, path)
    return path


def read_arrays(path: Path) -> ArrayRecord:
    """The ArrayRecord ``write_arrays`` wrote to ``path``, keys in the same order."""
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fedmed arrays file (format {metadata.get('format')!r})")
        layout = json.loads(metadata["layout"])
        record = ArrayRecord()
        for key, (dtype, shape, stype) in layout.items():
            record[key] = Array(dtype=dtype, shape=tuple(int(s) for s in shape), stype=stype,
                                data=handle.get_tensor(key).tobytes())
    return record


def arrays_file(config: ConfigRecord) -> Path | None:
    """The file a message's ConfigRecord points to, or None when its arrays travel in the message."""
    value = config.get(ARRAYS_FILE_KEY) if config is not None else None
    return Path(str(value)) if value else None


def shared_directory(needed_bytes: int) -> Path:
    """A new private directory in ``/dev/shm`` when it has room for ``needed_bytes``, else in the
    temporary directory (on disk, still in the page cache while a round runs)."""
    parent = Path(tempfile.gettempdir())
    if _SHARED_MEMORY.is_dir() and os.access(_SHARED_MEMORY, os.W_OK) \
            and shutil.disk_usage(_SHARED_MEMORY).free > needed_bytes:
        parent = _SHARED_MEMORY
    return Path(tempfile.mkdtemp(prefix="fedmed-arrays-", dir=parent))


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
        path = write_arrays(arrays, self.directory / f"global-{uuid.uuid4().hex}.safetensors")
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
    return global_file.parent / f"reply-{msg.metadata.message_id}.safetensors"
