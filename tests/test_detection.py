"""Scoring the strategy's flags against the runner's ground truth (fedmed/detection.py)."""

import pytest

from fedmed.detection import run_totals, score_round


def test_round_counts_and_rates():
    r = score_round(flagged=[7, 2], participants=range(10), attackers=[2, 3])
    assert (r.tp, r.fp, r.fn, r.tn) == (1, 1, 1, 7)
    assert r.tpr == 0.5 and r.fpr == pytest.approx(1 / 8)
    assert r.metrics()["detection/flagged"] == [2, 7]


def test_attackers_outside_the_round_are_not_misses():
    # partition 9 is malicious but was not sampled this round
    r = score_round(flagged=[], participants=[0, 1, 2], attackers=[9])
    assert r.tpr is None and r.fn == 0 and r.fpr == 0.0


def test_flag_of_a_non_participant_is_an_error():
    with pytest.raises(ValueError, match=r"\[5\]"):
        score_round(flagged=[5], participants=[0, 1], attackers=[])


def test_run_totals():
    rounds = [
        score_round([], [0, 1, 2, 3], []),  # before the attack starts
        score_round([3], [0, 1, 2, 3], [3]),
        score_round([0, 3], [0, 1, 2, 3], [3]),
    ]
    totals = run_totals(rounds)
    assert (totals["tp"], totals["fp"], totals["fn"], totals["tn"]) == (2, 1, 0, 9)
    assert totals["precision"] == pytest.approx(2 / 3) and totals["recall"] == 1.0
    assert run_totals([rounds[0]])["precision"] is None and run_totals([rounds[0]])["recall"] is None
