"""Categorical columns -> hashed ids (the feature-hashing trick): nothing to fit; the
buckets are in the fitted parameters, so serving hashes as training did."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from distml.data.transforms.base import Columns, Transform, is_numeric


def _text(values: np.ndarray) -> np.ndarray:
    """A value's text: a number as its integer text when it is whole (42.0 -> "42")."""
    if not is_numeric(values):
        return values.astype(str)
    v = values.astype(np.float64)
    whole = np.isfinite(v) & (v == np.round(v))
    return np.where(whole, np.round(np.where(whole, v, 0)).astype(np.int64).astype(str),
                    v.astype(str))


def hash_ids(values: np.ndarray, buckets: int) -> np.ndarray:
    """Each value's id in [0, buckets): BLAKE2b-64 of its UTF-8 text, mod buckets (the same
    on every machine and Python: not ``hash``, which is salted per process)."""
    uniq, inverse = np.unique(_text(values), return_inverse=True)
    codes = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(),
                                     "little") % buckets for u in uniq.tolist()],
                     dtype=np.int64)
    return codes[inverse.reshape(-1)].astype(np.float32)  # exact below 2^24


class Hash(Transform):
    def needs_fit(self, spec: Any) -> bool:
        return False

    def params(self, spec: Any) -> dict[str, Any]:
        return {"type": "hash", "columns": spec.columns, "buckets": spec.buckets}

    def encodes(self, spec: Any) -> list[str]:
        return spec.columns

    def apply(self, p: dict[str, Any], cols: Columns) -> Columns:
        out = dict(cols)
        for name, buckets in zip(p["columns"], p["buckets"], strict=True):
            if name not in out:
                raise ValueError(f"transform hash: column {name!r} does not exist; columns: "
                                 f"{list(cols)}")
            out[name] = hash_ids(out[name], buckets)
        return out
