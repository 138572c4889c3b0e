"""Named seed streams: every purpose draws from its own stream of the run's seed."""

import itertools

from fedmed.seeds import Stream, derive_seed, seed_for


def test_no_two_streams_share_a_seed_and_each_is_reproducible():
    for seed in (0, 1, 12345):
        seeds = {(stream, parts): seed_for(seed, stream, *parts) for stream in Stream for parts in ((), (7,), (7, 3))}
        assert len(set(seeds.values())) == len(seeds)
        assert all(seed_for(seed, stream, *parts) == value for (stream, parts), value in seeds.items())


def test_the_draws_that_shared_derive_seed_7_are_now_unrelated():
    # partition 7's hold-out, round 7's aggregator noise and the assessment all were derive_seed(seed, 7)
    seeds = [seed_for(0, Stream.HOLDOUT, 7), seed_for(0, Stream.AGGREGATOR_NOISE, 7), seed_for(0, Stream.ASSESSMENT)]
    assert len(set(seeds)) == 3
    assert derive_seed(0, 7) not in seeds


def test_streams_differ_between_run_seeds_and_stay_in_63_bits():
    for stream, (a, b) in itertools.product(Stream, [(0, 1), (1, 2)]):
        assert seed_for(a, stream) != seed_for(b, stream)
        assert 0 <= seed_for(a, stream) < 2**63
