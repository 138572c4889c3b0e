"""A model's ArrayRecord as one Array of bytes, for models that travel inside Flower's messages.

Flower 1.42 moves every Array of a message (and every 5 MB chunk of a large one) as an object of
its own: each is hashed, sent in its own HTTP request (signed and verified when SuperNodes
authenticate), stored by the SuperLink and pulled again by the other side, through the server
app, the SuperLink, the SuperNode and the ClientApp process. With a state dict of a hundred or
more tensors, a deployed step's transport cost was in the number of objects more than in the
bytes (README, "Benchmark: what a deployed step costs beyond training"). Packed, a model is one
Array whose bytes have the layout of ``fedmed.shared_arrays`` (a JSON header naming each
Array's key, dtype, shape and serialisation, then their bytes back to back), so it travels as a
handful of 5 MB chunks and comes back byte for byte.

Both sides of a message run the same app (the run's FAB), so the server packs what it sends and
the clients pack their replies. Unpacking checks the header against the data; it runs no code.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message

from fedmed.shared_arrays import header_bytes, parse_header

PACKED_KEY = "fedmed-packed"
PACKED_STYPE = "fedmed.arrayrecord"


def pack(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` as an ArrayRecord of one Array of bytes (one copy of the model)."""
    data = b"".join([header_bytes(arrays), *(array.data for array in arrays.values())])
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY] and record[PACKED_KEY].stype == PACKED_STYPE


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord ``pack`` packed, keys in the same order; ``record`` itself when it is not
    packed. ValueError saying what is wrong when the packed bytes are not a whole model."""
    if not is_packed(record):
        return record
    data = record[PACKED_KEY].data
    entries, position = parse_header(data, len(data))
    view = memoryview(data)
    unpacked = ArrayRecord()
    for key, dtype, shape, stype, nbytes in entries:
        if position + nbytes > len(data):
            raise ValueError(f"the packed arrays end inside array '{key}'")
        unpacked[key] = Array(dtype=dtype, shape=shape, stype=stype, data=bytes(view[position : position + nbytes]))
        position += nbytes
    if position != len(data):
        raise ValueError(f"the packed arrays have {len(data) - position} bytes after their last array")
    return unpacked


def unpack_reply(msg: Message) -> str | None:
    """Replace a reply's packed ArrayRecords by what they hold, in place; why it could not, or None
    (also for failed replies and replies without packed arrays)."""
    if msg.has_error():
        return None
    for name, record in list(msg.content.array_records.items()):
        try:
            msg.content[name] = unpack(record)
        except ValueError as error:
            return f"its packed arrays could not be read: {error}"
    return None
