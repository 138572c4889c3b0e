"""A simulated client's ``Context.state`` as one ConfigRecord, to and from the server.

In simulation the nodes' contexts live in the driver process and die with it, so a resumed run
would restart every DP-SGD accountant from zero. A simulated client therefore returns its state
with each training reply (``STATE_RECORD``), the server keeps the latest per partition in its
checkpoint and sends it with every training message, and the client takes it as its state. Only
ConfigRecords whose values JSON can hold travel (the DP-SGD accountant's history is one).
Deployed sites keep their state to themselves: they never send it.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, RecordDict

STATE_RECORD = "fedmed-client-state"
_KEY = "records"


def state_to_record(state: RecordDict) -> ConfigRecord:
    """``state``'s ConfigRecords as one ConfigRecord (JSON text)."""
    others = set(state.keys()) - set(state.config_records.keys())
    if others:
        raise TypeError(
            f"Context.state holds {sorted(others)}, not ConfigRecords: only ConfigRecords are "
            "sent to the server for checkpoints"
        )
    return ConfigRecord(
        {_KEY: json.dumps({name: dict(record) for name, record in state.config_records.items()}, sort_keys=True)}
    )


def records_of(record: ConfigRecord) -> dict[str, dict]:
    return json.loads(str(record[_KEY]))


def restore_state(state: RecordDict, records: dict[str, dict]) -> None:
    """Replace ``state``'s ConfigRecords by ``records`` (as ``records_of`` returns them)."""
    for name in list(state.config_records.keys()):
        del state[name]
    for name, values in records.items():
        state[name] = ConfigRecord(values)


def record_from(records: dict[str, dict]) -> ConfigRecord:
    return ConfigRecord({_KEY: json.dumps(records, sort_keys=True)})
