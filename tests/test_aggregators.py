"""Robust aggregators (strategies/aggregators) and the strategy that runs them (strategies/robust_aggregation.py).

* equal to Flower's FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan on the same replies
  (same selection, same aggregate), and exact where a float32 Gram trick on raw weights is not;
* every rule on planted attackers; permutation equivariance; clear errors;
* RobustAggregation end to end on Flower Messages.
"""

from __future__ import annotations

import logging

import flwr.serverapp.strategy.multikrum as flower_multikrum
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan as FlowerBulyan
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from flwr.serverapp.strategy import FedTrimmedAvg as FlowerFedTrimmedAvg
from flwr.serverapp.strategy import Krum as FlowerKrum
from flwr.serverapp.strategy import MultiKrum as FlowerMultiKrum

from fedmed.serialization import array_view
from strategies.aggregators import AGGREGATORS, TooFewReplies, aggregator_from_config, make_aggregator
from strategies.aggregators.foolsgold import FoolsGold
from strategies.aggregators.ops import (
    GRAM_CHUNK_COLUMNS,
    _block_gram,
    batcher_runs,
    closest_window,
    gram,
    median_windows,
    middle,
    sort_columns_,
    sq_distances,
)
from strategies.robust_aggregation import RobustAggregation, apply_update, flat_update, stack_updates, update_size
from strategies.strategy import FedMedStrategy

SHAPES = {"conv": (6, 5, 5), "fc": (40, 50), "bias": (50,)}
D = sum(int(np.prod(s)) for s in SHAPES.values())  # 2,950


def split(flat: np.ndarray) -> ArrayRecord:
    arrays, offset = {}, 0
    for key, shape in SHAPES.items():
        size = int(np.prod(shape))
        arrays[key] = Array(np.ascontiguousarray(flat[offset : offset + size].reshape(shape)))
        offset += size
    return ArrayRecord(arrays)


def joined(record: ArrayRecord) -> np.ndarray:
    return np.concatenate([record[key].numpy().ravel() for key in SHAPES])


def reply(pid: int, record: ArrayRecord, num_examples: int) -> Message:
    ins = Message(RecordDict(), dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": num_examples, "partition-id": pid, "train_loss": 0.5 + pid})
    return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=ins)


def robust(aggregator, global_record: ArrayRecord, n: int, seed: int = 0, **kwargs) -> RobustAggregation:
    s = RobustAggregation(
        {100 + i: i for i in range(n)}, clients_per_round=n, seed=seed, aggregator=aggregator, **kwargs
    )
    list(s.configure_train(1, global_record, ConfigRecord(), grid=None))
    return s


def federation(seed: int, n: int, scale: float, step: float, spread: tuple[float, float] = (0.5, 3.0)):
    """Global weights ~ scale * N(0, 1); client i's weights = global + step * (c + s_i * noise),
    with s_i spread out so that Krum scores are well apart. Returns (global, weights, counts)."""
    rng = np.random.default_rng(seed)
    g = (scale * rng.normal(size=D)).astype(np.float32)
    common = rng.normal(size=D)
    sizes = rng.permutation(np.linspace(*spread, n))
    weights = [(g + step * (common + s * rng.normal(size=D))).astype(np.float32) for s in sizes]
    counts = [int(c) for c in rng.integers(10, 100, size=n)]
    return g, weights, counts


@pytest.fixture
def record_flower_selection(monkeypatch):
    """Partition ids Flower's Multi-Krum selection picked, read inside its aggregate_train."""
    picked: list[list[int]] = []
    original = flower_multikrum.select_multikrum

    def recording(contents, num_malicious_nodes, num_nodes_to_select):
        chosen = original(contents, num_malicious_nodes, num_nodes_to_select)
        picked.append(sorted(int(c["metrics"]["partition-id"]) for c in chosen))
        return chosen

    monkeypatch.setattr(flower_multikrum, "select_multikrum", recording)
    return picked, recording


def both(name: str, flower_strategy, seed=0, n=13, **params):
    """Flower's and our aggregate (flat numpy) of the same replies, and our strategy."""
    g, weights, counts = federation(seed, n, scale=1.0, step=0.01)
    flower_out, _ = flower_strategy.aggregate_train(
        1, [reply(i, split(w), c) for i, (w, c) in enumerate(zip(weights, counts))]
    )
    ours = robust(make_aggregator(name, **params), split(g), n)
    our_out, _ = ours.aggregate_train(1, [reply(i, split(w), c) for i, (w, c) in enumerate(zip(weights, counts))])
    return joined(flower_out), joined(our_out), ours


@pytest.mark.usefixtures("task_identity")
class TestSameAsFlower:
    def test_fedmedian(self):
        for n in (10, 11):  # even: mean of the two middle values, as np.median
            flower, ours, _ = both("fedmedian", FlowerFedMedian(), n=n)
            np.testing.assert_allclose(ours, flower, rtol=0, atol=2e-7)

    def test_trimmed_mean(self):
        for n, beta in ((10, 0.2), (13, 0.2), (12, 0.34)):
            flower, ours, _ = both("trimmed_mean", FlowerFedTrimmedAvg(beta=beta), n=n, beta=beta)
            np.testing.assert_allclose(ours, flower, rtol=0, atol=5e-7)

    def test_krum(self, record_flower_selection):
        picked, _ = record_flower_selection
        for seed in range(3):
            flower, ours, s = both("krum", FlowerKrum(num_malicious_nodes=3), seed=seed, num_malicious=3)
            (chosen,) = set(range(13)) - set(s.findings_of(1).detection.flagged)
            assert picked[-1] == [chosen]
            np.testing.assert_allclose(ours, flower, rtol=0, atol=2e-7)

    def test_multikrum_weights_its_selection_by_examples(self, record_flower_selection):
        picked, _ = record_flower_selection
        flower, ours, s = both(
            "multikrum", FlowerMultiKrum(num_malicious_nodes=2, num_nodes_to_select=6), num_malicious=2, num_to_keep=6
        )
        kept = sorted(set(range(13)) - set(s.findings_of(1).detection.flagged))
        assert picked[-1] == kept and len(kept) == 6
        np.testing.assert_allclose(ours, flower, rtol=0, atol=3e-7)

    def test_bulyan(self, record_flower_selection):
        picked, recording = record_flower_selection
        for n, f in ((11, 2), (16, 3)):  # theta odd, then even (np.median: mean of the middle two)
            flower, ours, s = both(
                "bulyan", FlowerBulyan(num_malicious_nodes=f, selection_rule=recording), n=n, num_malicious=f
            )
            theta = n - 2 * f
            dropped = sorted(set(range(n)) - set(picked[-1]))
            assert len(picked[-1]) == theta
            assert [pid for pid, score in s.findings_of(1).detection.scores.items() if score == 1.0] == dropped
            np.testing.assert_allclose(ours, flower, rtol=0, atol=3e-7)

    def test_bulyan_refuses_fewer_than_4f_plus_3_like_flower(self):
        g, weights, counts = federation(0, 10, 1.0, 0.01)
        replies = [reply(i, split(w), c) for i, (w, c) in enumerate(zip(weights, counts))]
        assert FlowerBulyan(num_malicious_nodes=2).aggregate_train(1, replies) == (None, None)
        with pytest.raises(
            TooFewReplies,
            match=r"strategy.num_malicious=2 is too large for 10 replies: "
            r"Bulyan needs n >= 4f \+ 3",
        ):
            make_aggregator("bulyan", num_malicious=2).aggregate(
                torch.zeros(10, 5), torch.ones(10), client_ids=range(10), generator=torch.Generator()
            )


@pytest.mark.usefixtures("task_identity")
def test_krum_on_large_weights_picks_what_exact_float64_distances_pick():
    """Weights of magnitude ~100 with updates ~1e-3 of different sizes: distances computed with the
    Gram trick, |x|^2 + |y|^2 - 2 x.y, in float32 on such raw weights are rounding noise (the
    norms are ~3e7, one float32 step there is 2, the distances ~1e-2; Flower 1.42's Krum computes
    them that way: docs/architecture.md). Ours, on the updates, pick what exact float64 distances
    between the same float32 weights pick, and report those scores."""
    n, f = 10, 2
    for seed in range(5):
        g, weights, counts = federation(seed, n, scale=100.0, step=1e-3, spread=(0.5, 2.0))
        exact = np.array(
            [[np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2) for b in weights] for a in weights]
        )
        off = exact + np.diag(np.full(n, np.inf))
        exact_scores = np.sort(off, axis=1)[:, : n - f - 2].sum(1)
        expected = int(np.argmin(exact_scores))

        ours = robust(make_aggregator("krum", num_malicious=f), split(g), n)
        out, _ = ours.aggregate_train(1, [reply(i, split(w), c) for i, (w, c) in enumerate(zip(weights, counts))])
        assert set(range(n)) - set(ours.findings_of(1).detection.flagged) == {expected}
        np.testing.assert_array_equal(joined(out), weights[expected])
        our_scores = torch.tensor([ours.findings_of(1).detection.scores[i] for i in range(n)])
        np.testing.assert_allclose(our_scores.numpy(), exact_scores, rtol=1e-4)


# ---- planted attackers -------------------------------------------------------------------------

N_HONEST = 9


def byzantine(seed=0, d=2000):
    """9 honest updates c + noise, an opposite one (-8c) and a boosted one (+4c): each an extreme
    on its own side of most coordinates, both far from the honest ones."""
    gen = torch.Generator().manual_seed(seed)
    c = 0.1 * torch.randn(d, generator=gen)
    honest = c + 0.02 * torch.randn(N_HONEST, d, generator=gen)
    attackers = torch.stack([-8 * c, 4 * c]) + 0.001 * torch.randn(2, d, generator=gen)
    reference = c + 0.02 * torch.randn(d, generator=gen)  # FLTrust's server update
    return torch.cat([honest, attackers]).float(), honest.mean(0), c, reference.float()


def sybils(seed=0, d=2000):
    """9 diverse honest updates (non-IID: pairwise cosine about 0.5) and two sybils pushing the
    same backdoor direction, as FoolsGold's threat model."""
    gen = torch.Generator().manual_seed(seed)
    c = 0.1 * torch.randn(d, generator=gen)
    b = 0.1 * torch.randn(d, generator=gen)
    b -= (b @ c) / (c @ c) * c
    honest = c + 0.1 * torch.randn(N_HONEST, d, generator=gen)
    attackers = (2 * b + 0.5 * c) + 0.001 * torch.randn(2, d, generator=gen)
    return torch.cat([honest, attackers]).float(), honest.mean(0), c, None


# rule -> (scenario, attacker rows that must be flagged)
PLANTED = {
    "fedmedian": (byzantine, [9, 10]),
    "trimmed_mean": (byzantine, [9, 10]),
    "krum": (byzantine, [9, 10]),
    "multikrum": (byzantine, [9, 10]),
    "bulyan": (byzantine, [9, 10]),
    "rfa": (byzantine, [9, 10]),
    "norm_clip": (byzantine, [9, 10]),
    "weak_dp": (byzantine, [9, 10]),
    # cosine rules: the boosted attacker points the honest way; it is admitted, and bounded by
    # FLAME's clipping / FLTrust's rescaling to the server update's norm
    "flame": (byzantine, [9]),
    "fltrust": (byzantine, [9]),
    "foolsgold": (sybils, [9, 10]),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_attackers_are_flagged_and_the_aggregate_stays_honest(name):
    scenario, attackers = PLANTED[name]
    updates, honest_mean, c, reference = scenario()
    n = updates.shape[0]
    counts = torch.full((n,), 50.0)
    mean_result = make_aggregator("fedavg").aggregate(
        updates, counts, client_ids=range(n), generator=torch.Generator().manual_seed(0), reference=reference
    )
    result = make_aggregator(name).aggregate(
        updates, counts, client_ids=range(n), generator=torch.Generator().manual_seed(0), reference=reference
    )
    assert mean_result.flagged == [] and torch.all(mean_result.scores == 0)
    assert set(attackers) <= set(result.flagged), result.flagged
    error = float((result.update - honest_mean).norm())
    mean_error = float((mean_result.update - honest_mean).norm())
    assert mean_error > 0.3 * float(c.norm())
    assert error < 0.5 * mean_error, (error, mean_error)
    assert float(result.scores[attackers].min()) > float(result.scores[:N_HONEST].median())


@pytest.mark.parametrize("name", ["fedmedian", "trimmed_mean", "bulyan", "rfa", "multikrum", "fltrust"])
def test_honest_clients_mostly_not_flagged(name):
    updates, _, _, reference = byzantine(seed=1)
    result = make_aggregator(name).aggregate(
        updates, torch.full((11,), 50.0), client_ids=range(11), generator=torch.Generator(), reference=reference
    )
    honest_flagged = [i for i in result.flagged if i < N_HONEST]
    assert len(honest_flagged) <= (2 if name in ("multikrum", "bulyan") else 0), result.flagged


# ---- permutation equivariance ------------------------------------------------------------------


def run(aggregator, updates, counts, ids, reference, seed=5):
    return aggregator.aggregate(
        updates, counts, client_ids=ids, generator=torch.Generator().manual_seed(seed), reference=reference
    )


def assert_equivariant(a, b, perm):
    """b was computed on rows permuted by perm (row r of b's input = row perm[r] of a's)."""
    np.testing.assert_allclose(b.update.numpy(), a.update.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.scores.numpy(), a.scores[perm].numpy(), rtol=1e-5, atol=1e-6)
    assert sorted(int(perm[r]) for r in b.flagged) == a.flagged


@pytest.mark.parametrize("name", [n for n in AGGREGATORS if n != "foolsgold"])
@pytest.mark.parametrize("scenario", [byzantine, sybils])
def test_shuffling_clients_permutes_the_decisions_only(name, scenario):
    updates, _, _, reference = scenario(seed=3)
    if reference is None:
        reference = updates[:N_HONEST].mean(0)
    n = updates.shape[0]
    counts = torch.arange(10.0, 10.0 + n)
    ids = [7 * i + 3 for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    a = run(make_aggregator(name), updates, counts, ids, reference)
    b = run(make_aggregator(name), updates[perm], counts[perm], [ids[i] for i in perm], reference)
    assert_equivariant(a, b, perm)


def test_foolsgold_shuffled_over_three_rounds():
    first, second = FoolsGold(), FoolsGold()
    ids = [11, 4, 25, 8, 16, 3, 42, 9, 30, 1, 77]
    for rnd in range(3):
        updates, _, _, _ = sybils(seed=10 + rnd)
        counts = torch.full((11,), 20.0)
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(rnd))
        a = run(first, updates, counts, ids, None)
        b = run(second, updates[perm], counts[perm], [ids[i] for i in perm], None)
        assert_equivariant(a, b, perm)
        assert {9, 10} <= set(a.flagged)


def test_ties_are_broken_by_client_id_not_by_position():
    gen = torch.Generator().manual_seed(0)
    sybil = torch.randn(1, 3000, generator=gen)
    u = torch.cat([sybil.repeat(4, 1), sybil + 0.5 * torch.randn(3, 3000, generator=gen)])
    ids = [5, 3, 9, 1, 7, 2, 8]
    for perm in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [2, 4, 0, 6, 1, 3, 5]):
        shuffled_ids = [ids[i] for i in perm]
        for name in ("krum", "multikrum"):
            result = make_aggregator(
                name, num_malicious=0, **({"num_to_keep": 2} if name == "multikrum" else {})
            ).aggregate(u[perm], torch.ones(7), client_ids=shuffled_ids, generator=torch.Generator())
            kept = sorted(shuffled_ids[i] for i in set(range(7)) - set(result.flagged))
            assert kept == ([1] if name == "krum" else [1, 3])  # the four copies tie: smallest ids
            # exactly equal scores for the copies, whatever their rows
            copies = [r for r, i in enumerate(perm) if i < 4]
            assert len(set(result.scores[copies].tolist())) == 1


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("trimmed_mean", {"beta": 0.5}, r"strategy.beta=0.5 must be in \[0, 0.5\)"),
        ("krum", {"num_malicious": -1}, "strategy.num_malicious=-1 must be an integer >= 0"),
        ("multikrum", {"num_to_keep": 0}, "strategy.num_to_keep=0 must be an integer >= 1"),
        ("norm_clip", {"clip_norm": 0.0}, "strategy.clip_norm=0.0 must be a finite number > 0"),
        ("weak_dp", {"noise_std": -1.0}, "strategy.noise_std=-1.0 must be a finite number >= 0"),
        ("flame", {"noise_lambda": float("nan")}, "strategy.noise_lambda=nan"),
        ("rfa", {"max_iter": 0}, "strategy.max_iter=0 must be an integer >= 1"),
        ("fedmedian", {"num_malicious": 2}, "strategy=fedmedian has no key strategy.num_malicious"),
        ("krum", {"colour": 1}, "strategy=krum has no key strategy.colour; its keys are strategy.name, "),
        ("krum", {"num_malicious": "two"}, "strategy=krum: .*strategy.num_malicious"),
        ("fltrust", {"root_samples": 0}, "strategy.root_samples=0 must be an integer >= 1"),
        ("median", {}, "strategy='median' is not known; use one of fedavg, fedmedian"),
    ],
)
def test_bad_parameters_name_the_key(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, **params)


def test_every_rule_is_a_config_option_with_only_its_own_keys():
    from tests.helpers import compose_config

    for name, rule in AGGREGATORS.items():
        cfg = compose_config(f"strategy={name}")
        assert cfg.strategy.name == name and set(cfg.strategy) == {"name", *rule.params()}
        assert type(aggregator_from_config(cfg.strategy)) is rule
    with pytest.raises(Exception, match="strategy.num_malicious"):
        compose_config("strategy=fedmedian", "strategy.num_malicious=1")
    assert make_aggregator("fltrust").needs_root_update and not make_aggregator("krum").needs_root_update


@pytest.mark.parametrize(
    "name, params, n, message",
    [
        (
            "krum",
            {"num_malicious": 7},
            10,
            r"strategy.num_malicious=7 is too large for 10 replies: Krum needs n > 2f \+ 2",
        ),
        ("multikrum", {"num_malicious": 4}, 10, r"Krum needs n > 2f \+ 2"),
        ("multikrum", {"num_to_keep": 12}, 10, "strategy.num_to_keep=12 is more than the 10 replies"),
        ("bulyan", {}, 2, r"strategy=bulyan cannot aggregate 2 replies: Bulyan needs n >= 4f \+ 3"),
    ],
)
def test_too_few_replies(name, params, n, message):
    with pytest.raises(TooFewReplies, match=message):
        make_aggregator(name, **params).aggregate(
            torch.zeros(n, 4), torch.ones(n), client_ids=range(n), generator=torch.Generator()
        )


def test_fltrust_needs_a_reference():
    with pytest.raises(ValueError, match="fltrust needs the server's reference update"):
        make_aggregator("fltrust").aggregate(
            torch.ones(3, 4), torch.ones(3), client_ids=range(3), generator=torch.Generator()
        )


def test_bad_inputs():
    agg = make_aggregator("fedavg")
    with pytest.raises(TypeError, match="float32"):
        agg.aggregate(torch.zeros(3, 4, dtype=torch.float64), torch.ones(3), client_ids=range(3), generator=None)
    with pytest.raises(ValueError, match="distinct client ids"):
        agg.aggregate(torch.zeros(3, 4), torch.ones(3), client_ids=[1, 1, 2], generator=None)
    with pytest.raises(ValueError, match="positive"):
        agg.aggregate(torch.zeros(3, 4), torch.tensor([1.0, 0.0, 2.0]), client_ids=range(3), generator=None)


def test_degenerate_rounds_keep_the_global_model(caplog):
    u = torch.rand(4, 30, generator=torch.Generator().manual_seed(0)) + 0.1  # cosines with -1: negative
    with caplog.at_level(logging.WARNING):
        result = make_aggregator("fltrust").aggregate(
            u, torch.ones(4), client_ids=range(4), generator=torch.Generator(), reference=-torch.ones(30)
        )
    assert result.flagged == [0, 1, 2, 3] and torch.all(result.update == 0)
    assert "global model is kept" in caplog.text
    same = torch.randn(1, 30, generator=torch.Generator().manual_seed(0)).repeat(3, 1)  # FoolsGold: all weights 0
    result = FoolsGold().aggregate(same, torch.ones(3), client_ids=range(3), generator=torch.Generator())
    assert torch.all(result.update == 0) and result.flagged == [0, 1, 2]


# ---- kernels -----------------------------------------------------------------------------------


def test_sorting_network_sorts_every_size():
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 70):
        x = torch.randn(n, 40, generator=gen)
        x[:, :5] = x[:1, :5]  # ties
        assert torch.equal(sort_columns_(x.clone()), torch.sort(x, dim=0).values), n
    assert len(batcher_runs(50)) < 250


def test_closest_window_holds_the_values_nearest_the_median():
    gen = torch.Generator().manual_seed(0)
    for rows, width in ((7, 3), (8, 6), (28, 6), (52, 4), (11, 11)):
        s = torch.sort(torch.randn(rows, 500, generator=gen), dim=0).values
        m = middle(s)
        mean, low, high = closest_window(s, m, width, median_windows(rows, width))
        everywhere = closest_window(s, m, width)  # the restriction to windows at the middle loses nothing
        assert torch.equal(low, everywhere[1]) and torch.equal(high, everywhere[2])
        nearest = s.gather(0, (s - m).abs().topk(width, dim=0, largest=False).indices)
        torch.testing.assert_close(mean, nearest.mean(0))
        assert torch.equal(low, nearest.min(0).values) and torch.equal(high, nearest.max(0).values)


def test_closest_window_takes_the_first_of_tied_windows():
    gen = torch.Generator().manual_seed(1)
    for rows, width in ((7, 3), (28, 6), (10, 4)):
        s = torch.sort(torch.randint(-3, 4, (rows, 400), generator=gen).float(), dim=0).values  # many ties
        m = middle(s)
        mean, low, high = closest_window(s, m, width)
        for col in range(s.shape[1]):  # the plain loop: first window with the smallest reach
            column, center = s[:, col].tolist(), float(m[col])
            reaches = [max(center - column[k], column[k + width - 1] - center) for k in range(rows - width + 1)]
            k = reaches.index(min(reaches))
            assert (low[col], high[col]) == (column[k], column[k + width - 1])
            assert mean[col] == pytest.approx(sum(column[k : k + width]) / width)


def test_gram_distances_on_updates_are_exact_enough():
    gen = torch.Generator().manual_seed(0)
    u = 1e-3 * torch.randn(6, 5000, generator=gen)
    exact = torch.cdist(u.double(), u.double()) ** 2
    np.testing.assert_allclose(sq_distances(gram(u)).numpy(), exact.numpy(), rtol=1e-5, atol=1e-12)
    rows = list(u)
    np.testing.assert_allclose(gram(rows, block=777).numpy(), gram(u).numpy(), rtol=1e-6, atol=1e-10)


def test_gram_over_chunks_and_blocks_matches_float64():
    """Whole chunks (one batched GEMM), a shorter rest, a last short block, and rows as a list."""
    gen = torch.Generator().manual_seed(1)
    u = 1e-3 * torch.randn(7, 3 * GRAM_CHUNK_COLUMNS + 1234, generator=gen)
    exact = exact_of(u)
    within = {"rtol": 0, "atol": 1e-5 * exact.diagonal().max()}  # float32 sums, against the norms
    np.testing.assert_allclose(gram(u).numpy(), exact, **within)
    np.testing.assert_allclose(gram(list(u), block=2 * GRAM_CHUNK_COLUMNS).numpy(), exact, **within)
    short = u[:, :1000]
    np.testing.assert_allclose(
        _block_gram(short, chunk=64).numpy(), exact_of(short), rtol=0, atol=1e-5 * exact_of(short).diagonal().max()
    )


def exact_of(x: torch.Tensor) -> np.ndarray:
    return (x.double() @ x.double().T).numpy()


# ---- RobustAggregation on Messages -------------------------------------------------------------

GLOBAL = ArrayRecord(
    {
        "w": Array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)),
        "num_batches_tracked": Array(np.array(7, dtype=np.int64)),
        "b": Array(np.zeros(4, np.float32)),
    }
)


def client_record(delta_w: np.ndarray, delta_b: np.ndarray, tracked=99) -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array((GLOBAL["w"].numpy() + delta_w).astype(np.float32)),
            "num_batches_tracked": Array(np.array(tracked, dtype=np.int64)),
            "b": Array((GLOBAL["b"].numpy() + delta_b).astype(np.float32)),
        }
    )


@pytest.mark.usefixtures("task_identity")
def test_robust_aggregation_end_to_end(caplog):
    rng = np.random.default_rng(0)
    direction_w, direction_b = rng.normal(size=(3, 4)), rng.normal(size=4)
    replies = []
    for pid in range(7):
        replies.append(
            reply(
                pid,
                client_record(
                    0.1 * direction_w + 0.01 * rng.normal(size=(3, 4)), 0.1 * direction_b + 0.01 * rng.normal(size=4)
                ),
                10 + pid,
            )
        )
    bad_w = np.zeros((3, 4))
    bad_w[1, 2] = np.nan
    replies.append(reply(7, client_record(bad_w, np.zeros(4)), 10))
    replies.append(reply(8, client_record(-5 * direction_w, -5 * direction_b), 10))  # attacker
    s = robust(make_aggregator("multikrum", num_malicious=2), GLOBAL, 9)
    with caplog.at_level(logging.WARNING):
        out, metrics = s.aggregate_train(1, list(reversed(replies)))
    assert [r.partition_id for r in s.findings_of(1).rejected] == [7] and "NaN" in s.findings_of(1).rejected[0].reason
    detection = vars(s.findings_of(1).detection)
    assert sorted(detection["scores"]) == [0, 1, 2, 3, 4, 5, 6, 8]
    assert 8 in detection["flagged"] and 7 not in detection["flagged"]
    kept = [p for p in range(7) if p not in detection["flagged"]]
    weights = np.array([10 + p for p in kept], dtype=np.float64)
    updates = [joined_wb(replies[p]) - joined_wb_global() for p in kept]
    expected = joined_wb_global() + np.average(updates, axis=0, weights=weights)
    got = np.concatenate([out["w"].numpy().ravel(), out["b"].numpy().ravel()])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.isfinite(got).all()
    assert list(out.keys()) == list(GLOBAL.keys())
    assert out["num_batches_tracked"].numpy() == 7 and out["num_batches_tracked"].numpy().dtype == np.int64
    assert "partition-id" not in metrics and metrics["train_loss"] > 0
    assert [m["partition-id"] for m in s.findings_of(1).clients] == [0, 1, 2, 3, 4, 5, 6, 8]


def joined_wb(msg: Message) -> np.ndarray:
    rec = msg.content["arrays"]
    return np.concatenate([rec["w"].numpy().ravel(), rec["b"].numpy().ravel()]).astype(np.float64)


def joined_wb_global() -> np.ndarray:
    return np.concatenate([GLOBAL["w"].numpy().ravel(), GLOBAL["b"].numpy().ravel()]).astype(np.float64)


@pytest.mark.usefixtures("task_identity")
def test_robust_fedavg_matches_fedmedavg_and_both_report_detection():
    rng = np.random.default_rng(1)
    delta_w, delta_b = rng.normal(size=(4, 3, 4)) * 0.1, rng.normal(size=(4, 4)) * 0.1

    def replies():
        return [reply(p, client_record(delta_w[p], delta_b[p], tracked=7), 5 + p) for p in range(4)]

    plain = FedMedStrategy({100 + i: i for i in range(4)}, clients_per_round=4, seed=0)
    list(plain.configure_train(1, GLOBAL, ConfigRecord(), grid=None))
    a, _ = plain.aggregate_train(1, replies())
    b, _ = robust(make_aggregator("fedavg"), GLOBAL, 4).aggregate_train(1, replies())
    np.testing.assert_allclose(b["w"].numpy(), a["w"].numpy(), atol=1e-6)
    assert vars(plain.findings_of(1).detection) == {"scores": {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0}, "flagged": []}


@pytest.mark.usefixtures("task_identity")
def test_round_with_too_few_replies_keeps_the_global_model(caplog):
    s = robust(make_aggregator("bulyan", num_malicious=1), GLOBAL, 7)
    replies = [reply(p, client_record(np.full((3, 4), 0.1), np.zeros(4)), 10) for p in range(6)]
    with caplog.at_level(logging.WARNING):
        out, metrics = s.aggregate_train(1, replies)
    assert out is None and metrics is not None and "Bulyan needs n >= 4f + 3" in caplog.text
    assert vars(s.findings_of(1).detection) == {"scores": {}, "flagged": []}
    with pytest.raises(ValueError, match=r"federation.clients_per_round=6"):
        RobustAggregation(
            {100 + i: i for i in range(8)},
            clients_per_round=6,
            seed=0,
            aggregator=make_aggregator("bulyan", num_malicious=1),
        )


@pytest.mark.usefixtures("task_identity")
def test_fltrust_strategy_uses_the_reference_and_noise_is_seeded():
    direction = np.random.default_rng(2).normal(size=16).astype(np.float32)
    reference = lambda arrays, num_examples: torch.from_numpy(direction)  # noqa: E731
    s = robust(make_aggregator("fltrust"), GLOBAL, 3, reference_update=reference)
    replies = [
        reply(p, client_record(sign * direction[:12].reshape(3, 4), sign * direction[12:]), 10)
        for p, sign in enumerate((1.0, 0.5, -1.0))
    ]
    out, _ = s.aggregate_train(1, replies)
    assert s.findings_of(1).detection.flagged == [2]
    np.testing.assert_allclose(joined_wb_from(out) - joined_wb_global(), direction, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reference_update"):
        robust(make_aggregator("fltrust"), GLOBAL, 3)
    noisy = [
        robust(make_aggregator("weak_dp"), GLOBAL, 3, seed=seed).aggregate_train(1, replies)[0] for seed in (0, 0, 1)
    ]
    assert np.array_equal(joined_wb_from(noisy[0]), joined_wb_from(noisy[1]))
    assert not np.array_equal(joined_wb_from(noisy[0]), joined_wb_from(noisy[2]))


def joined_wb_from(rec: ArrayRecord) -> np.ndarray:
    return np.concatenate([rec["w"].numpy().ravel(), rec["b"].numpy().ravel()]).astype(np.float64)


def test_flat_update_and_apply_update_round_trip():
    rec = client_record(np.full((3, 4), 0.25), np.full(4, -0.5), tracked=3)
    u = flat_update(rec, GLOBAL)
    assert u.dtype == torch.float32 and u.shape == (16,)
    back = apply_update(GLOBAL, u)
    np.testing.assert_array_equal(back["w"].numpy(), rec["w"].numpy())
    np.testing.assert_array_equal(back["b"].numpy(), rec["b"].numpy())
    assert back["num_batches_tracked"].numpy() == 7
    assert torch.equal(stack_updates([rec, GLOBAL], GLOBAL)[0], u)
    with pytest.raises(ValueError, match="15 values"):
        apply_update(GLOBAL, u[:15])


MIXED_SHAPES = {
    "conv.weight": ((4, 3, 3), np.float32),
    "bn.weight": ((4,), np.float32),
    "bn.running_mean": ((4,), np.float32),
    "bn.running_var": ((4,), np.float32),
    "bn.num_batches_tracked": ((), np.int64),
    "head.weight": ((2, 5), np.float64),
    "head.bias": ((2,), np.float32),
}


def mixed_record(rng: np.random.Generator, scale: float = 1.0) -> ArrayRecord:
    return ArrayRecord(
        {
            key: Array(
                np.asarray(
                    rng.integers(0, 9, size=shape) if dtype == np.int64 else scale * rng.normal(size=shape)
                ).astype(dtype)
            )
            for key, (shape, dtype) in MIXED_SHAPES.items()
        }
    )


def reference_round(rule, records, global_record, counts, ids, server_round, seed, reference=None) -> ArrayRecord:
    """The aggregation path written out plainly from Flower's own (de)serialisation: each update
    as ``Array.numpy()`` differences (float32 where both are, else float64), concatenated; the
    new arrays as ``Array(global + slice)``."""
    from strategies.robust_aggregation import batchnorm_statistics, float_keys, round_generator

    keys = float_keys(global_record)

    def difference(w: np.ndarray, g: np.ndarray) -> np.ndarray:
        if w.dtype == np.float32 and g.dtype == np.float32:
            return (w - g).ravel()
        return (w.astype(np.float64) - g.astype(np.float64)).astype(np.float32).ravel()

    stacked = np.stack(
        [np.concatenate([difference(r[k].numpy(), global_record[k].numpy()) for k in keys]) for r in records]
    )
    counts = torch.tensor(counts, dtype=torch.float64)
    result = rule.aggregate(
        torch.from_numpy(stacked),
        counts,
        client_ids=ids,
        generator=round_generator(seed, server_round),
        reference=reference,
    )
    update = result.update if result.noise is None else result.update + result.noise
    statistics = batchnorm_statistics(records, counts, result.flagged)
    out, offset = {}, 0
    for key, array in global_record.items():
        g = array.numpy()
        if key in keys:
            part = update.numpy()[offset : offset + g.size].reshape(g.shape)
            offset += g.size
            out[key] = Array(g + part if g.dtype == np.float32 else (g.astype(np.float64) + part).astype(g.dtype))
        elif statistics is not None and key in statistics:
            out[key] = Array(np.ascontiguousarray(statistics[key]).reshape(g.shape))
        else:
            out[key] = Array(g.copy())
    return ArrayRecord(out)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_server_path_gives_the_reference_model_byte_for_byte(name):
    """stack_updates into the strategy's kept buffer, the rule, apply_update: every new Array
    has the reference's bytes, in a first round and in a second one that reuses the buffer with
    fewer replies (a stale row from round one would change the aggregate)."""
    rng = np.random.default_rng(7)
    global_record = mixed_record(rng)
    direction = torch.from_numpy(rng.normal(size=update_size(global_record)).astype(np.float32))
    reference = lambda arrays, num_examples: direction  # noqa: E731  (FLTrust's root update)
    strategy = robust(
        make_aggregator(name),
        global_record,
        7,
        seed=3,
        **({"reference_update": reference} if name == "fltrust" else {}),
    )
    own_rule = make_aggregator(name)  # fed the same rounds, for the stateful rules (FoolsGold)
    for server_round, n in ((1, 7), (2, 6)):
        if server_round > 1:
            list(strategy.configure_train(server_round, global_record, ConfigRecord(), grid=None))
        records = [mixed_record(rng, scale=1.0 + 0.1 * i) for i in range(n)]
        counts = [10 + 3 * i for i in range(n)]
        out, _ = strategy.aggregate_train(
            server_round, [reply(p, r, c) for p, (r, c) in enumerate(zip(records, counts))]
        )
        expected = reference_round(
            own_rule,
            records,
            global_record,
            counts,
            list(range(n)),
            server_round,
            3,
            direction if name == "fltrust" else None,
        )
        assert list(out.keys()) == list(expected.keys())
        for key in expected:
            assert out[key].data == expected[key].data, (name, server_round, key)
        global_record = out
    assert torch.equal(
        stack_updates(records, global_record), stack_updates(records, global_record, torch.zeros(9, direction.numel()))
    )


BN_GLOBAL = ArrayRecord(
    {
        "bn.weight": Array(np.ones(2, np.float32)),
        "bn.running_mean": Array(np.zeros(2, np.float32)),
        "bn.running_var": Array(np.full(2, 0.01, np.float32)),
        "bn.num_batches_tracked": Array(np.array(3, np.int64)),
    }
)


def bn_record(weight: float, mean: float, var: float) -> ArrayRecord:
    return ArrayRecord(
        {
            "bn.weight": Array(np.full(2, weight, np.float32)),
            "bn.running_mean": Array(np.full(2, mean, np.float32)),
            "bn.running_var": Array(np.full(2, var, np.float32)),
            "bn.num_batches_tracked": Array(np.array(9, np.int64)),
        }
    )


def test_batchnorm_statistics_are_not_in_the_update_and_noise_reaches_weights_only():
    # the statistics' change dwarfs the weights' (47.6 against 0.80 for ResNet18): FLAME's noise,
    # 0.001 x the median update norm, wrecked the weights while they were in the update
    assert flat_update(bn_record(2.0, 5.0, 9.0), BN_GLOBAL).tolist() == [1.0, 1.0]
    back = apply_update(BN_GLOBAL, torch.tensor([0.5, 0.5]), torch.full((2,), -0.25))
    np.testing.assert_allclose(back["bn.weight"].numpy(), [1.25, 1.25])
    np.testing.assert_array_equal(back["bn.running_var"].numpy(), BN_GLOBAL["bn.running_var"].numpy())
    with pytest.raises(ValueError, match="noise has 3 values"):
        apply_update(BN_GLOBAL, torch.tensor([0.5, 0.5]), torch.zeros(3))
    # FLAME and weak DP hand their noise over apart from the update, drawn from the generator
    updates = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32))
    for rule in (make_aggregator("flame"), make_aggregator("weak_dp")):
        result = rule.aggregate(updates, torch.ones(5), client_ids=range(5), generator=torch.Generator().manual_seed(0))
        again = rule.aggregate(updates, torch.ones(5), client_ids=range(5), generator=torch.Generator().manual_seed(0))
        assert result.noise is not None and result.noise.shape == (6,) and result.noise.abs().sum() > 0
        assert torch.equal(result.noise, again.noise)
    assert (
        make_aggregator("fedavg")
        .aggregate(updates, torch.ones(5), client_ids=range(5), generator=torch.Generator())
        .noise
        is None
    )


@pytest.mark.usefixtures("task_identity")
def test_batchnorm_statistics_are_averaged_over_the_clients_the_rule_kept():
    # four alike clients and one far off: Krum keeps one of the four, MultiKrum all four
    records = [bn_record(1.0 + 0.01 * i, mean=float(i), var=1.0 + i) for i in range(4)] + [bn_record(9.0, 100.0, 50.0)]
    counts = [10, 10, 10, 30, 10]
    for name, expected_rows in (("multikrum", [0, 1, 2, 3]), ("krum", None)):
        s = robust(make_aggregator(name, num_malicious=1), BN_GLOBAL, 5)
        out, _ = s.aggregate_train(1, [reply(p, r, c) for p, (r, c) in enumerate(zip(records, counts))])
        kept = [p for p in range(5) if p not in s.findings_of(1).detection.flagged]
        assert 4 not in kept
        if expected_rows is not None:
            assert kept == expected_rows
        weights = np.array([counts[p] for p in kept], np.float64)
        mean = sum(w * p for w, p in zip(weights / weights.sum(), kept))
        np.testing.assert_allclose(out["bn.running_mean"].numpy(), [mean, mean], rtol=1e-6)
        np.testing.assert_allclose(out["bn.running_var"].numpy(), [1.0 + mean] * 2, rtol=1e-6)
        assert int(out["bn.num_batches_tracked"].numpy()) == 3


def test_array_view_reads_the_serialised_values_in_place():
    rng = np.random.default_rng(0)
    for value in (
        rng.normal(size=(3, 4)).astype(np.float32),
        rng.normal(size=5),
        np.float16([1.5, -2]),
        np.array(7, dtype=np.int64),
        np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32)),
        np.zeros((0, 3), np.float32),
        rng.normal(size=4).astype(">f4"),
    ):
        array = Array(value)
        view = array_view(array)
        np.testing.assert_array_equal(view, array.numpy().reshape(-1))
        assert view.dtype == array.numpy().dtype


def test_a_run_folder_from_the_flat_strategy_schema_resumes_with_its_rules_keys(tmp_path):
    from omegaconf import OmegaConf

    from fedmed.checkpoint import resumed_config
    from tests.helpers import compose_config

    flat = {  # every rule's keys, as config.yaml held them before each rule had its own
        "name": "multikrum",
        "num_malicious": 1,
        "num_to_keep": None,
        "compile_stage": None,
        "beta": 0.2,
        "clip_norm": None,
        "noise_std": 0.002,
        "noise_lambda": 0.001,
        "max_iter": 10,
        "root_samples": 100,
        "root_iterations": None,
    }
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"strategy": flat, "seed": 0}))
    saved = resumed_config(tmp_path, compose_config(), [])
    assert OmegaConf.to_container(saved.strategy) == {"name": "multikrum", "num_malicious": 1, "num_to_keep": None}
    assert aggregator_from_config(saved.strategy).num_malicious == 1
