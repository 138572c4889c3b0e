"""Every random draw of a run comes from a named stream of the run's ``seed``.

``seed_for(seed, Stream.X, *parts)`` is the seed of stream X; ``parts`` (round, partition id,
...) tell the draws within a stream apart. Two streams never share a seed: the stream's number
is part of what is hashed (numpy's ``SeedSequence``), so partition 7's hold-out, round 7's
aggregator noise and the robustness assessment are unrelated draws, which they were not when
each was ``derive_seed(seed, 7)``.

A client's round has its own seed (``Stream.CLIENT_ROUND``); the draws inside the round (batch
order, the adversarial start, DP noise, ...) are streams of that seed in turn.
"""

from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    # --- from the run's seed ---
    DATASET = 15  # what loading the dataset draws: generated images, an image folder's split
    DATA_SPLIT = 1  # the train split cut among the clients (fedmed.data.client_partitions)
    HOLDOUT = 2  # each client's local validation share, by partition
    SITE_SHIFT = 3  # partition=site: each site's acquisition shift (fedmed.site_shift)
    SITE_FILES = 4  # fedmed-sites: the shift baked into a site's files, by partition and split
    MODEL_INIT = 5  # the global model's initial weights (and the server's global generators)
    CLIENT_SAMPLING = 6  # which clients train and evaluate each round
    CLIENT_ROUND = 7  # a client's training round, by round and partition
    CLIENT_EVALUATION = 8  # a client's evaluation round, by round and partition
    MALICIOUS_CLIENTS = 9  # which partitions are malicious
    EDGE_CASE = 10  # the edge-case tail: its sample, its PCA, its attacker/test split (parts 1-3)
    AGGREGATOR_NOISE = 11  # FLAME's and weak DP's noise, by round
    ASSESSMENT = 12  # the server's robustness assessment: its test subset and attack starts
    ROOT_DATA = 13  # FLTrust: the server's root dataset
    ROOT_TRAINING = 14  # FLTrust: the server's update, by call
    # --- from a client's round seed ---
    BATCH_ORDER = 21  # shuffling and augmentation in local training
    TORCH_GLOBAL = 22  # torch's global generator in the round (dropout)
    SITE_NOISE = 23  # the site shift's noise on the client's batches
    ADVERSARIAL_START = 24  # random starts of adversarial training
    PRIVACY_NOISE = 25  # DP-SGD's Gaussian noise and Poisson sampling
    OVERFITTING_CHECK = 26  # the images and attack starts of the catastrophic-overfitting check
    POISON_POOL = 27  # a data-poisoning attacker's pool
    GAUSSIAN_UPDATE = 28  # the gaussian attacker's update
    EVALUATION_SUBSET = 29  # the subset of a client's hold-out it assesses


# keeps these seeds apart from any derive_seed(seed, ...) of a few small integers
_NAMESPACE = 0x73656564


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers (numpy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_for(seed: int, stream: Stream, *parts: int) -> int:
    """The seed of ``stream`` (and ``parts`` within it) of a run, or a round, seeded ``seed``."""
    return derive_seed(seed, _NAMESPACE, int(stream), *parts)
