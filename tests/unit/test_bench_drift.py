"""bench/drift.py's drifting streams really change: the rows after the change are new rows
(none repeats a row from before it, the model's training rows included), for every stream."""

from __future__ import annotations

import numpy as np
import pytest
from bench.drift import POST, PRE, STREAMS, TRAIN, VAL, stream
from bench.drift_columns import REF_ROWS, _shifted, _stationary, rows


@pytest.mark.parametrize("name", STREAMS)
def test_rows_after_the_change_are_not_rows_from_before(name):
    x, _ = stream(name, 0, drifting=True)
    before, after = x[:TRAIN + VAL + PRE], x[TRAIN + VAL + PRE:]
    assert len(after) == POST
    seen = {row.tobytes() for row in before}
    repeated = sum(row.tobytes() in seen for row in after)
    assert repeated == 0, f"{repeated} of {POST} rows after the change repeat earlier rows"


def test_column_streams_are_fresh_rows_not_the_reference():
    seen = {row.tobytes() for row in rows(REF_ROWS, np.random.default_rng([0, 0]))}
    first = next(_stationary(0, 1000, 10_000))
    assert not any(row.tobytes() in seen for row in first)
    shifted = _shifted(0, 0.25)
    shifted[:, 1] -= 0.25
    assert not any(row.tobytes() in seen for row in shifted)
    assert _shifted(0, 0.25)[:, 1].mean() == pytest.approx(0.25, abs=0.02)
