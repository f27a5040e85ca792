"""scikit-learn's bundled handwritten digits (no download: the data ships with scikit-learn)."""

from __future__ import annotations

import numpy as np

from distml.data.sources.base import Chunk, RawChunk, Source


class Digits(Source):
    """1,797 images of 8x8 pixels, one column per pixel; loads in one piece."""

    def load_chunk(self, chunk: Chunk) -> RawChunk:
        from sklearn import datasets  # heavy, and needed only by this source

        bunch = datasets.load_digits()
        data = bunch.data.astype(np.float32)
        names = [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
        return RawChunk({n: data[:, j] for j, n in enumerate(names)}, bunch.target)
