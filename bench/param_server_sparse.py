"""The sparse parameter server against one process holding the table.

A ClickModel (a 2M-row and a 1000-row table of 16 floats, dense features, an MLP) on a
synthetic click log (power-law ids, a hidden model's label): once with its tables on two
row servers (rows by hash, lazy Adam on the servers) and one worker that holds only each
batch's rows, once in one process with ``nn.EmbeddingBag(sparse=True)`` and SparseAdam,
the same initial rows and batches. Reported: the worker's and the servers' peak resident
memory, the worker's peak RSS growth while training over the table's bytes
(``worker_rss_over_table_bytes``: the memory point; the whole process's RSS is mostly
torch itself, reported beside it), training samples/s against the single process (three
processes on 2 cores and a round trip per batch per server: no speedup is expected), and
the validation AUC gap. ``DISTML_BENCH_QUICK=1``: a 200k-row table, fewer rows.

Run alone: ``python -m bench.param_server_sparse`` (about a minute); ``python -m bench
param_server`` runs it too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score

from bench.common import QUICK
from bench.sparse_procs import BIG, click_data, free_port, run_big, single_process


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {**BIG, "cards": [200_000, 1000], "train": 8_000, "val": 4_000, "epochs": 1}
    return {**BIG, "train": 40_000, "val": 20_000}


def main(quick: bool | None = None) -> dict[str, Any]:
    quick = QUICK if quick is None else quick
    big = sizes(quick)
    with tempfile.TemporaryDirectory(prefix="distml-bench-sparse-") as tmp:
        mp.spawn(run_big, args=(free_port(), tmp, big), nprocs=3, join=True)
        worker = json.loads(Path(tmp, "worker.json").read_text())
        servers = [json.loads(Path(tmp, f"server-{s}.json").read_text()) for s in (0, 1)]
    single_scores, single_s = single_process(big)
    y = click_data(big["train"], big["train"] + big["val"], big)[1].flatten().numpy()
    table_bytes = sum(c * big["dim"] * 4 for c in big["cards"])
    samples = big["train"] * big["epochs"]
    auc_sharded, auc_single = roc_auc_score(y, worker["scores"]), roc_auc_score(y, single_scores)
    return {
        "sparse": {"tables": big["cards"], "dim": big["dim"], "train_rows": big["train"],
                   "val_rows": big["val"], "epochs": big["epochs"], "batch": big["batch"],
                   "table_bytes": table_bytes, "worker_peak_rss": worker["peak_rss"],
                   "worker_rss_growth": worker["rss_growth"],
                   "server_peak_rss": [s["peak_rss"] for s in servers],
                   "server_rows_held": [s["rows"] for s in servers],
                   "server_table_bytes": [s["table_bytes"] for s in servers],
                   "auc": auc_sharded, "auc_single_process": auc_single,
                   "samples_per_s": samples / worker["train_s"],
                   "samples_per_s_single_process": samples / single_s, "quick": quick},
        "sparse_samples_per_s_vs_single_process": single_s / worker["train_s"],
        "sparse_auc_gap_vs_single_process": abs(auc_single - auc_sharded),
        "worker_rss_over_table_bytes": worker["rss_growth"] / table_bytes,
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
