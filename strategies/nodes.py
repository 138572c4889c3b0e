"""Who is in the federation: simulated partitions, or deployed sites known by stable names.

The server sends every node that connects one small query. A simulated node answers with its
partition id; a deployed site with its name (node config ``site``) and its examples per class.
Sites get partition ids in the order of their names, so the same sites make the same federation
(sampling, aggregation order, the per-client table) whatever random node ids Flower gives them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmed.logs import log

SITE_RECORD = "site"  # the query reply's ConfigRecord holding a deployed site's name


@dataclass
class Federation:
    """Node id -> partition id, and for deployed sites their names and class counts."""

    partition_of_node: dict[int, int]
    site_of_partition: dict[int, str] = field(default_factory=dict)
    class_counts: dict[int, list[int]] = field(default_factory=dict)

    @property
    def deployed(self) -> bool:
        return bool(self.site_of_partition)

    def name(self, partition_id: int | None) -> str | None:
        """How records name a client: its site's name when deployed, else its partition id."""
        if partition_id is None:
            return None
        return self.site_of_partition.get(partition_id, str(partition_id))

    def label_counts(self, num_classes: int) -> np.ndarray:
        """(sites, classes) examples per class, in partition order, as the sites reported them."""
        counts = np.zeros((len(self.class_counts), num_classes), dtype=np.int64)
        for pid, row in sorted(self.class_counts.items()):
            if len(row) > num_classes:
                raise ValueError(
                    f"site {self.site_of_partition[pid]!r} has labels up to {len(row) - 1}, but the "
                    f"federation's dataset has {num_classes} classes (labels 0..{num_classes - 1})"
                )
            counts[pid, : len(row)] = row
        return counts


def _identity(reply: Message) -> tuple[int | None, str | None, list[int] | None]:
    metrics = reply.content["metrics"]
    if SITE_RECORD in reply.content:
        return None, str(reply.content[SITE_RECORD]["name"]), [int(c) for c in metrics["class-counts"]]
    return int(metrics["partition-id"]), None, None


def _query(node_ids: list[int]) -> list[Message]:
    return [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]


def discover(grid: Grid, num_nodes: int, timeout: float) -> Federation:
    """Wait (at most ``timeout`` s) until ``num_nodes`` nodes have answered the query, logging
    who has connected, by site name, as they come."""
    deadline = time.monotonic() + timeout
    pending: dict[str, int] = {}  # query message id -> node id
    asked: set[int] = set()
    answers: dict[int, tuple] = {}
    log.info(
        "fedmed: waiting up to %.0f s for %d sites (federation.num_clients, federation.connect_timeout_s)",
        timeout,
        num_nodes,
    )
    while len(answers) < num_nodes:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            pending.update({mid: node for mid, node in zip(grid.push_messages(_query(new)), new) if mid})
            asked.update(new)
        if pending:
            arrived = list(grid.pull_messages(list(pending)))
            for reply in arrived:
                node = pending.pop(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    raise RuntimeError(f"node {node} failed fedmed's query (its site data?): {reply.error.reason}")
                answers[node] = _identity(reply)
            if arrived:
                log.info("fedmed: %d of %d sites connected: %s", len(answers), num_nodes, _names(answers))
        if len(answers) >= num_nodes:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(answers)} of federation.num_clients={num_nodes} sites connected within "
                f"{timeout:.0f} s (federation.connect_timeout_s); connected: {_names(answers) or 'none'}. "
                "Start the missing SuperNodes, or set federation.num_clients to the number of sites."
            )
        time.sleep(0.5)
    return _federation(answers)


# Connected nodes named in a log line at most: listing all of 1000 simulated partitions at every
# poll wrote 150 kB of log before the first round.
MAX_NAMED = 20


def _names(answers: dict[int, tuple]) -> str:
    names = sorted(site if site is not None else f"partition {pid}" for pid, site, _ in answers.values())
    if len(names) <= MAX_NAMED:
        return ", ".join(names)
    return ", ".join(names[:MAX_NAMED]) + f" and {len(names) - MAX_NAMED} more"


def _federation(answers: dict[int, tuple]) -> Federation:
    sites = {node: site for node, (_, site, _) in answers.items() if site is not None}
    if not sites:
        partition_of_node = {node: pid for node, (pid, _, _) in answers.items()}
        if len(set(partition_of_node.values())) != len(partition_of_node):
            raise RuntimeError(f"two nodes report the same partition id: {sorted(partition_of_node.values())}")
        return Federation(partition_of_node)
    if len(sites) != len(answers):
        raise RuntimeError(
            "simulated partitions and deployed sites in one federation: start every "
            "SuperNode with --node-config 'data-path=\"...\"'"
        )
    names = sorted(sites.values())
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(
            f'two SuperNodes call themselves {duplicates}: give each site its own name (node config site="...")'
        )
    pid_of_site = {name: pid for pid, name in enumerate(names)}
    return Federation(
        partition_of_node={node: pid_of_site[site] for node, site in sites.items()},
        site_of_partition={pid: name for name, pid in pid_of_site.items()},
        class_counts={pid_of_site[site]: answers[node][2] for node, site in sites.items()},
    )


def online_partitions(grid: Grid, partition_of_node: dict[int, int]) -> list[int]:
    """Partitions whose node the SuperLink counts as online now (a lost site is offline until it
    reconnects: Flower marks a node offline after two missed heartbeats)."""
    online = set(grid.get_node_ids())
    return sorted(pid for node, pid in partition_of_node.items() if node in online)
