"""Bulyan's fused per-coordinate stage (torch.compile) against its eager stage."""

import logging

import pytest
import torch

from strategies.aggregators import fused, make_aggregator
from strategies.aggregators.fused import FUSE_BLOCK_COLUMNS, bulyan_stage


def aggregate(rule, updates):
    n = updates.shape[0]
    return rule.aggregate(updates, torch.ones(n), client_ids=range(n), generator=torch.Generator())


def planted_updates(n: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    updates = torch.randn(n, d, generator=g)
    updates[: d // 2] = torch.round(updates[: d // 2] * 2)  # many ties in the first half of the rows
    updates[:, : d // 3] = torch.round(updates[:, : d // 3] * 2) / 2  # and in the first third of the columns
    updates[:, 5] = 1.0  # a column where everyone agrees
    updates[0] += 4.0  # an outlier the Krum stage drops
    return updates


@pytest.mark.slow  # compiles the kernel: some 10-30 s on the CI machine
def test_fused_stage_is_the_eager_stage_bit_for_bit():
    n, d = 11, 2 * FUSE_BLOCK_COLUMNS + 123  # two compiled blocks and an eager remainder
    updates = planted_updates(n, d)
    eager = aggregate(make_aggregator("bulyan", compile_stage=False), updates)
    fused_rule = make_aggregator("bulyan", compile_stage=True)
    result = aggregate(fused_rule, updates)
    assert fused_rule._compiled == {(7, 3)}  # f = 2: theta = 7, beta = 3; the kernel really ran
    assert torch.equal(result.update, eager.update)
    assert torch.equal(result.scores, eager.scores)
    assert result.flagged == eager.flagged and 0 in result.flagged


def test_stage_function_matches_the_eager_ops_on_ties():
    # the function the kernel is compiled from, run eagerly: same window choice on ties
    n, d = 9, 300
    updates = planted_updates(n, d)
    eager = aggregate(make_aggregator("bulyan", num_malicious=1, compile_stage=False), updates)
    selected = [i for i in range(n) if eager.scores[i] < 1]
    assert len(selected) == 7
    mean, low, high, outside, informative = bulyan_stage(7, 5)(*[updates[i] for i in selected])  # f = 1: beta = 5
    assert torch.equal(mean, eager.update)
    assert int(informative) == d - 1  # column 5 is all equal
    assert torch.equal(outside.double() / int(informative), eager.scores[selected])
    assert bool((low <= mean).all() and (mean <= high).all())


def test_automatic_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def no_compiler(theta, beta):
        def fail(*rows):
            raise RuntimeError("no C++ compiler")

        return fail

    monkeypatch.setattr("strategies.aggregators.bulyan.compiled_bulyan_stage", no_compiler)
    monkeypatch.setattr("strategies.aggregators.bulyan.FUSE_AUTO_VALUES", 1)  # auto chooses the kernel
    updates = planted_updates(11, FUSE_BLOCK_COLUMNS + 7)
    expected = aggregate(make_aggregator("bulyan", compile_stage=False), updates)
    automatic = make_aggregator("bulyan")
    with caplog.at_level(logging.WARNING):
        result = aggregate(automatic, updates)
    assert "torch.compile could not build the fused stage" in caplog.text and "no C++ compiler" in caplog.text
    assert torch.equal(result.update, expected.update) and automatic.compile_stage is False
    with pytest.raises(RuntimeError, match="strategy.compile_stage=false"):
        aggregate(make_aggregator("bulyan", compile_stage=True), updates)


def test_automatic_choice_and_bad_values():
    rule = make_aggregator("bulyan")
    assert rule._fuse(28, fused.FUSE_AUTO_VALUES // 28 + 1, torch.device("cpu"))
    assert not rule._fuse(28, 1000, torch.device("cpu"))
    assert not make_aggregator("bulyan", compile_stage=True)._fuse(28, 10**9, torch.device("meta"))
    assert not make_aggregator("bulyan", compile_stage=False)._fuse(28, 10**9, torch.device("cpu"))
    with pytest.raises(ValueError, match="strategy=bulyan: .*'maybe'.*strategy.compile_stage"):
        make_aggregator("bulyan", compile_stage="maybe")
    with pytest.raises(ValueError, match="strategy=krum has no key strategy.compile_stage"):
        make_aggregator("krum", compile_stage=True)
