"""Bulyan.

El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
ICML 2018.
"""

from __future__ import annotations

import torch

from strategies.aggregators.base import Aggregate, above_expected
from strategies.aggregators.krum import Krum
from strategies.aggregators.ops import (Scratch, closest_window, count_outside, lowest, median_windows, middle,
                                        sorted_column_blocks)


class Bulyan(Krum):
    """Krum-based selection of theta = n - 2f updates, then a coordinate-wise trimmed mean: in each
    coordinate, the unweighted mean of the beta = theta - 2f selected values closest to the
    selection's median. Needs n >= 4f + 3; ``num_malicious`` f = None takes the largest f that
    allows, (n - 3) // 4 (Flower's ``Bulyan`` defaults to f = 0, i.e. the plain mean).

    As Flower's ``Bulyan``, which we match: the selection is one Multi-Krum pass (the theta lowest
    Krum scores, neighbours n - f - 2, computed once over all n clients). The paper instead runs
    Krum theta times, removing each winner and recomputing the scores over the clients left. The
    median of an even number of values is the mean of the two middle ones (``np.median``).

    Score: the share of the client's coordinates that did not enter the final mean: 1 for the
    2f clients the Krum stage dropped; for the selected, the share of coordinates (where the
    selection does not all agree) in which their value lies outside the window of the beta values
    closest to the median (a value equal to the window's end counts as kept). Every selected
    client loses e = 2f / theta of its coordinates on average, so flagged = score above halfway
    between e and 1: every client the Krum stage dropped, and any selected one trimmed far more
    than the rest.
    """

    name = "bulyan"
    rule = "Bulyan needs n >= 4f + 3"

    def max_malicious(self, n: int) -> int:
        return (n - 3) // 4

    def min_replies(self, f: int) -> int:
        return 4 * f + 3

    def _aggregate(self, updates, num_examples, *, client_ids, generator, reference) -> Aggregate:
        n, d = updates.shape
        f = self.malicious(n)
        theta = n - 2 * f
        beta = theta - 2 * f
        krum = self.scores(updates)
        selected = torch.sort(lowest(krum, client_ids, theta)).values
        out = torch.empty(d, dtype=updates.dtype, device=updates.device)
        excluded = torch.zeros(theta, dtype=torch.float64, device=updates.device)
        informative = 0
        rows = selected.to(updates.device)
        scratch = Scratch()
        candidates = median_windows(theta, beta)
        for cols, s in sorted_column_blocks(updates, rows):
            m = middle(s)
            # the beta values closest to the median: a window of beta consecutive sorted values
            # that holds the middle one (or one of the two middle ones)
            out[cols], low, high = closest_window(s, m, beta, candidates, scratch)
            informative += int((s[-1] > s[0]).sum())
            raw = scratch("raw", s)
            torch.index_select(updates[:, cols], 0, rows, out=raw)
            excluded += count_outside(raw, low, high, scratch)
        scores = torch.ones(n, dtype=torch.float64)
        scores[selected] = excluded.cpu() / max(informative, 1)
        return Aggregate(out, scores, above_expected(scores, 2 * f / theta))
