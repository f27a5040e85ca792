"""A synthetic click log: high-cardinality categorical columns with power-law frequencies, a
few dense columns, and a label drawn from a hidden model, so AUC and log loss have a known
ceiling (``click_rows(..., oracle=True)`` gives the hidden model's probability).

The rows of [start, stop) are a function of (seed, start, stop): the same chunks give the
same rows (a chunk of rows cut differently is other rows of the same distribution). A categorical
value's popularity rank r is drawn with P(r) ~ 1/(r+1)^alpha (Zipf) and mapped to an id by
a seeded hash, so the popular ids are scattered over [0, cardinality), as hashed
categorical values are. The hidden model: logit = dense @ w + sum over features of
effect(feature, id) + bias, where an id's effect is a pure function of (seed, feature, id)
(never stored: cardinalities of millions cost nothing).
"""

from __future__ import annotations

import numpy as np

from distml.data.sources.base import Chunk, RawChunk, Source
from distml.data.sources.synthetic import row_chunks

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _unit(seed: int, feature: int, values: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) number per value, a pure function of (seed, feature, value)."""
    with np.errstate(over="ignore"):
        key = np.uint64(seed) * _GOLDEN + np.uint64(feature + 1) * np.uint64(0xD1B54A32D192ED03)
        z = _mix(values.astype(np.uint64) + key)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _zipf_ranks(rng: np.random.Generator, n: int, cardinality: int, alpha: float
                ) -> np.ndarray:
    """Ranks in [0, cardinality) with P(r) ~ (r+1)^-alpha, by inverting the continuous
    approximation of the CDF (exact enough for a benchmark's power law)."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        r = np.exp(u * np.log(cardinality + 1.0)) - 1.0
    else:
        a = 1.0 - alpha
        r = (u * ((cardinality + 1.0) ** a - 1.0) + 1.0) ** (1.0 / a) - 1.0
    return np.minimum(r.astype(np.int64), cardinality - 1)


def click_rows(seed: int, start: int, stop: int, *, cardinalities: list[int],
               num_dense: int = 4, alpha: float = 1.1, effect_scale: float = 1.0,
               oracle: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, stop): (dense float32 (n, num_dense), ids int64 (n, features), label
    float32 (n,) in {0, 1}, or the hidden click probability with ``oracle``)."""
    rng = np.random.default_rng([seed, start, stop])
    n = stop - start
    dense = rng.standard_normal((n, num_dense)).astype(np.float32)
    w = np.random.default_rng([seed, 1]).standard_normal(num_dense) * 0.5
    logit = dense @ w - 1.0  # clicks are the minority
    ids = np.empty((n, len(cardinalities)), dtype=np.int64)
    for f, card in enumerate(cardinalities):
        ranks = _zipf_ranks(rng, n, card, alpha)
        # rank -> id: a seeded affine permutation of [0, card) (odd multiplier mod a power
        # of two would not cover card; use a multiplier coprime to card)
        mult = _coprime(card, seed + f)
        ids[:, f] = (ranks * mult + seed * 7919 + f) % card
        logit += effect_scale * (2.0 * _unit(seed, f, ids[:, f]) - 1.0) * 1.5
    p = 1.0 / (1.0 + np.exp(-logit))
    if oracle:
        return dense, ids, p.astype(np.float32)
    return dense, ids, (rng.random(n) < p).astype(np.float32)


def _coprime(n: int, salt: int) -> int:
    m = (2654435761 + 2 * salt) % n or 1
    while np.gcd(m, n) != 1:
        m = m + 1 if m + 1 < n else 1
    return m


class Clicks(Source):
    """``synthetic:clicks``: dense columns d0.., categorical columns c0.. (each id as its
    decimal text: categorical values as such, hashed by preprocessing), a 0/1 label."""

    def plan_chunks(self, rows_per_partition: int) -> list[Chunk]:
        return row_chunks(self.spec.n_samples, rows_per_partition)

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src = self.spec
        dense, ids, label = click_rows(src.seed, chunk.start, chunk.stop,
                                       cardinalities=src.cardinalities,
                                       num_dense=src.num_dense, alpha=src.alpha)
        columns = {f"d{j}": dense[:, j] for j in range(src.num_dense)}
        columns.update({f"c{f}": ids[:, f].astype(str) for f in range(ids.shape[1])})
        return RawChunk(columns, label.astype(np.int64))
