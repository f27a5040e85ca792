"""The synthetic click log: power-law ids over the whole range, and a label from a hidden
model whose probability (the oracle) bounds the AUC any model can reach."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from distml.data.sources.clicks import click_rows


def test_ids_follow_a_power_law_and_the_oracle_bounds_the_auc():
    cards = [1_000_000, 50]
    dense, ids, y = click_rows(5, 0, 20_000, cardinalities=cards, num_dense=3)
    assert dense.shape == (20_000, 3)
    assert ids.shape == (20_000, 2)
    assert ids.min() >= 0
    assert (ids.max(axis=0) < cards).all()
    _, counts = np.unique(ids[:, 0], return_counts=True)
    top = np.sort(counts)[::-1]
    assert top[: len(top) // 100].sum() > 0.3 * len(ids)  # the 1% most frequent: > 30%
    assert ids[:, 0].max() > cards[0] // 2  # popular ids scattered over the range
    _, _, p = click_rows(5, 0, 20_000, cardinalities=cards, num_dense=3, oracle=True)
    assert 0.05 < y.mean() < 0.5  # clicks are the minority
    ceiling = roc_auc_score(y, p)
    assert 0.7 < ceiling < 1.0
    again = click_rows(5, 0, 20_000, cardinalities=cards, num_dense=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (dense, ids, y), strict=True))
