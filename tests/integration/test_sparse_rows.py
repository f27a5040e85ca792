"""Sparse rows over the wire: two server processes hold a ClickModel's tables (rows by
hash), one worker process trains through them with gloo, and ends with the rows the same
as training through in-process stores."""

from __future__ import annotations

import json

import torch.multiprocessing as mp

from tests.helpers.net import free_port
from tests.helpers.sparse_rows import run


def test_a_worker_trains_through_two_row_servers(tmp_path):
    out = tmp_path / "out.json"
    mp.spawn(run, args=(free_port(), str(out)), nprocs=3, join=True)
    result = json.loads(out.read_text())
    assert result["max_diff"] == 0.0  # the same arithmetic, moved across processes
    assert 0 < result["peak_rows"] <= 2 * 64
