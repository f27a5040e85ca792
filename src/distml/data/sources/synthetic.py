"""Generated data, in chunks of rows made from (seed, chunk index): the data does not depend
on how many workers made it, and millions of rows never sit in one process."""

from __future__ import annotations

import numpy as np

from distml.data.sources.base import Chunk, RawChunk, Source


def row_chunks(n: int, rows_per_partition: int) -> list[Chunk]:
    """Chunks of ``rows_per_partition`` consecutive rows of a generated source."""
    return [
        Chunk(i, f"rows {start}-{min(start + rows_per_partition, n) - 1}", None, start,
              min(start + rows_per_partition, n))
        for i, start in enumerate(range(0, n, rows_per_partition))
    ]


def _chunk_rng(seed: int, chunk: Chunk) -> np.random.Generator:
    return np.random.default_rng([seed, chunk.index])


class _Synthetic(Source):
    def plan_chunks(self, rows_per_partition: int) -> list[Chunk]:
        return row_chunks(self.spec.n_samples, rows_per_partition)


class SyntheticClassification(_Synthetic):
    """Gaussian clusters around class centres drawn from the seed alone."""

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src = self.spec
        centres = np.random.default_rng(src.seed).normal(
            0.0, src.class_sep, (src.n_classes, src.n_features)
        ).astype(np.float32)
        rng = _chunk_rng(src.seed, chunk)
        n = chunk.stop - chunk.start
        y = rng.integers(0, src.n_classes, n)
        x = centres[y] + src.noise * rng.standard_normal((n, src.n_features), dtype=np.float32)
        return RawChunk({f"x{j}": x[:, j] for j in range(src.n_features)}, y)


class SyntheticRegression(_Synthetic):
    """A linear function of the features (weights from the seed alone) plus noise."""

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        src = self.spec
        weights = np.random.default_rng(src.seed).standard_normal(src.n_features).astype(
            np.float32)
        rng = _chunk_rng(src.seed, chunk)
        n = chunk.stop - chunk.start
        x = rng.standard_normal((n, src.n_features), dtype=np.float32)
        y = x @ weights + src.noise * rng.standard_normal(n, dtype=np.float32)
        return RawChunk({f"x{j}": x[:, j] for j in range(src.n_features)}, y.astype(np.float32))
