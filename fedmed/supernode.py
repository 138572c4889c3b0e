"""`fedmed-supernode`: Flower's `flower-supernode`, looking for new messages more often.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps 3 s
before asking again (a constant in ``flwr.supernode.start_client_internal``); once it has handed
a message to its ClientApp it looks for the reply every 0.5 s. A training step therefore waits
up to 3.5 s on the SuperNode alone. This command is `flower-supernode` with every flag it has,
plus ``--poll-interval`` (seconds, 0.2 by default) that caps both waits, and
``--heartbeat-interval`` (seconds, Flower's 30 by default, at least 10): how often the SuperNode
tells the SuperLink it is alive. The SuperLink declares a site lost after two missed heartbeats,
so a site that dies mid-round holds that round for about twice this interval:

    fedmed-supernode --poll-interval 0.2 --heartbeat-interval 10 --superlink coordinator.example.org:9092 ...

It also retries the arrays of a message that have not reached the SuperLink yet after 0.05 s
instead of 1 s (then 2 s, 4 s). Each poll is one small request to the SuperLink, so a federation
of N sites sends it about N / poll-interval requests a second while idle. Flower has no setting
for these waits; ``fedmed/flower_waits.py`` replaces them.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_POLL_S = 0.2
DEFAULT_HEARTBEAT_S = 30.0  # Flower's HEARTBEAT_DEFAULT_INTERVAL
HEARTBEAT_RANGE_S = (10.0, 1800.0)  # what the SuperLink accepts (HEARTBEAT_MIN/MAX_INTERVAL)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="fedmed-supernode",
        description=__doc__.split("\n\n")[0] + " Every other flag goes to flower-supernode.",
        add_help=False,
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_S,
        help=f"seconds between the SuperNode's polls for messages and replies (default {DEFAULT_POLL_S}; Flower: 3)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULT_HEARTBEAT_S,
        help="seconds between the SuperNode's heartbeats; the SuperLink declares a site lost after two missed "
        "ones (default %(default)g, as Flower; from 10 to 1800)",
    )
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nflower-supernode's own flags:\n")
    if not 0.01 <= args.poll_interval <= 3:
        parser.error(f"--poll-interval {args.poll_interval}: give seconds from 0.01 to 3")
    low, high = HEARTBEAT_RANGE_S
    if not low <= args.heartbeat_interval <= high:
        parser.error(f"--heartbeat-interval {args.heartbeat_interval:g}: give seconds from {low:g} to {high:g}")
    return args, rest


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    from fedmed.flower_waits import (
        SUPERNODE_PULLS,
        cap_supernode_sleeps,
        set_heartbeat_interval,
        shorten_object_pull_backoff,
    )

    cap_supernode_sleeps(args.poll_interval)
    set_heartbeat_interval(args.heartbeat_interval)
    shorten_object_pull_backoff((SUPERNODE_PULLS,))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
