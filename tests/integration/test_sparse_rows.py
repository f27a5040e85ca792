"""Sparse rows over the wire: two server processes hold a ClickModel's tables (rows by
hash), one worker process trains through them with gloo: the rows end as training through
in-process stores leaves them, and a 128 MB table trains while the worker's peak memory
grows by less than an eighth of it, to the AUC of one process holding the table."""

from __future__ import annotations

import json

import torch.multiprocessing as mp
from bench.sparse_procs import BIG, click_data, run_big, single_process
from sklearn.metrics import roc_auc_score

from tests.helpers.net import free_port
from tests.helpers.sparse_rows import run


def test_a_worker_trains_through_two_row_servers(tmp_path):
    out = tmp_path / "out.json"
    mp.spawn(run, args=(free_port(), str(out)), nprocs=3, join=True)
    result = json.loads(out.read_text())
    assert result["max_diff"] == 0.0  # the same arithmetic, moved across processes
    assert 0 < result["peak_rows"] <= 2 * 64


def test_a_table_8x_the_workers_memory_growth_trains_to_the_single_process_auc(tmp_path):
    mp.spawn(run_big, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    worker = json.loads((tmp_path / "worker.json").read_text())
    table_bytes = BIG["cards"][0] * BIG["dim"] * 4 + BIG["cards"][1] * BIG["dim"] * 4
    assert worker["rss_growth"] * 8 <= table_bytes, worker["rss_growth"]
    assert worker["peak_rows"] <= BIG["batch"] * len(BIG["cards"])  # never the table
    servers = [json.loads((tmp_path / f"server-{s}.json").read_text()) for s in (0, 1)]
    assert sum(s["rows"] for s in servers) < BIG["cards"][0] // 2  # rows made when touched
    y = click_data(BIG["train"], BIG["train"] + BIG["val"])[1].flatten().numpy()
    sharded = roc_auc_score(y, worker["scores"])
    single = roc_auc_score(y, single_process()[0])
    assert sharded > 0.6  # it learned something
    assert abs(sharded - single) <= 0.005, (sharded, single)
