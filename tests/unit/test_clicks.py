"""The synthetic click log: power-law ids over the whole range, and a label from a hidden
model whose probability (the oracle) bounds the AUC any model can reach."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from distml.data.sources import open_source
from distml.data.sources.clicks import click_rows
from distml.data.transforms import apply
from tests.helpers.configs import data_config


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


def test_the_source_gives_categorical_text_and_hashing_maps_text_and_numbers_alike():
    data = data_config(source={"type": "synthetic:clicks", "n_samples": 50,
                               "cardinalities": [1000, 30], "num_dense": 2},
                       transforms=[{"type": "hash", "columns": ["c0", "c1"],
                                    "buckets": [1000, 30]}])
    source = open_source(data.source)
    (chunk,) = source.plan_chunks(100)
    raw = source.load_chunk(chunk)
    assert list(raw.columns) == ["d0", "d1", "c0", "c1"]
    assert raw.columns["c0"].dtype.kind == "U"  # categorical, as such
    params = [{"type": "hash", "columns": ["c0", "c1"], "buckets": [1000, 30]}]
    hashed = apply(params, raw.columns)
    numeric = apply(params, {**raw.columns, "c0": raw.columns["c0"].astype(np.float32),
                             "c1": raw.columns["c1"].astype(np.float32)})
    assert np.array_equal(hashed["c0"], numeric["c0"])
    assert np.array_equal(hashed["c1"], numeric["c1"])
    assert hashed["c0"].min() >= 0
    assert hashed["c0"].max() < 1000
    assert hashed["c1"].max() < 30
    with pytest.raises(ValidationError, match=r"hash buckets=\[10, 20, 30\] for columns"):
        data_config(source="sklearn:digits",
                    transforms=[{"type": "hash", "columns": ["a", "b"], "buckets": [10, 20, 30]}])
