"""Who is in the federation: discovery by query, stable partition ids from site names, sampling
of online nodes only, and failures recorded under the site's name (a fake grid, no processes)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from strategies.nodes import Federation, discover
from strategies.rounds import RoundLoop
from strategies.strategy import FedMedStrategy

pytestmark = pytest.mark.usefixtures("task_identity")


class FakeGrid:
    """Nodes that answer fedmed's query like deployed sites (or simulated partitions)."""

    def __init__(self, sites: dict[int, str | int], counts: dict[int, list[int]] | None = None) -> None:
        self.sites = sites
        self.counts = counts or {}
        self.online = set(sites)
        self.lost: set[int] = set()  # answered for by Flower (node id 1): the node is gone
        self.silent: set[int] = set()  # online, but never replies
        self.pushed: dict[str, Message] = {}

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.pushed)}-{i}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            node = self.pushed[mid].metadata.dst_node_id
            who = self.sites[node]
            if self.pushed[mid].metadata.message_type != MessageType.QUERY:
                if reply := self.round_reply(mid, node):
                    replies.append(reply)
                continue
            if isinstance(who, int):
                content = RecordDict({"metrics": MetricRecord({"partition-id": who})})
            else:
                content = RecordDict(
                    {
                        "metrics": MetricRecord({"class-counts": self.counts.get(node, [1, 2])}),
                        "site": ConfigRecord({"name": who}),
                    }
                )
            replies.append(Message(content, reply_to=self.pushed[mid]))
        return replies

    def round_reply(self, mid: str, node: int) -> Message | None:
        if node in self.silent:
            return None
        if node in self.lost:
            by_flower = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
            reply = Message(Error(code=5, reason="Node Unavailable"), reply_to=by_flower)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            return reply
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=self.pushed[mid])


def test_sites_get_partition_ids_in_name_order_whatever_their_node_ids():
    first = discover(FakeGrid({91: "st-mary", 17: "addenbrookes", 55: "leeds"}), 3, timeout=5)
    again = discover(FakeGrid({3: "leeds", 8: "st-mary", 999: "addenbrookes"}), 3, timeout=5)
    assert first.site_of_partition == again.site_of_partition == {0: "addenbrookes", 1: "leeds", 2: "st-mary"}
    assert first.partition_of_node == {17: 0, 55: 1, 91: 2}


def test_the_table_shows_the_sites_own_counts():
    federation = discover(FakeGrid({5: "b", 6: "a"}, {5: [3, 0, 7], 6: [4]}), 2, timeout=5)
    np.testing.assert_array_equal(federation.label_counts(3), [[4, 0, 0], [3, 0, 7]])
    with pytest.raises(ValueError, match="site 'b' has labels up to 2"):
        federation.label_counts(2)


def test_simulated_nodes_keep_their_partition_ids():
    federation = discover(FakeGrid({40: 1, 41: 0}), 2, timeout=5)
    assert federation.partition_of_node == {40: 1, 41: 0} and not federation.deployed


def test_two_sites_with_one_name_are_refused():
    with pytest.raises(RuntimeError, match=r"\['leeds'\]"):
        discover(FakeGrid({1: "leeds", 2: "leeds"}), 2, timeout=5)


def test_waiting_names_who_connected_and_fails_clearly(caplog):
    caplog.set_level(logging.INFO, logger="fedmed")  # the progress lines are INFO, whatever ran before
    with pytest.raises(TimeoutError, match="only 1 of federation.num_clients=3 sites .* connected: leeds"):
        discover(FakeGrid({7: "leeds"}), 3, timeout=1)
    assert "1 of 3 sites connected: leeds" in caplog.text


def test_a_lost_site_is_not_sampled_until_it_returns_and_its_failure_is_named():
    grid = FakeGrid({10: "a", 11: "b", 12: "c"})
    federation = discover(grid, 3, timeout=5)
    strategy = FedMedStrategy(federation.partition_of_node, clients_per_round=3, seed=0)
    strategy.federation = federation
    loop = RoundLoop(strategy, grid, timeout=0.5, min_replies=1)
    sent = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert len(sent) == 3
    # site b's SuperNode is killed during round 1 (Flower answers for it); site c is slow
    grid.lost.add(11)
    grid.online.discard(11)
    grid.silent.add(12)
    replies = loop._replies(1, "train", sent)
    assert len(replies) == 1
    assert sorted((f["client"], f["kind"]) for f in loop.failures[1]) == [("b", "lost"), ("c", "timeout")]
    sent = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [10, 12]
    grid.online.add(11)  # back
    sent = strategy.configure_train(3, ArrayRecord(), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in sent) == [10, 11, 12]


def test_federation_names_sites_and_partitions():
    federation = Federation({1: 0, 2: 1}, {0: "a", 1: "b"})
    assert federation.name(1) == "b" and Federation({1: 0}).name(0) == "0"
