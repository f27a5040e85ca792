"""Parallel preprocessing: fit + standardize + write of a 2,000,000 x 32 synthetic table.

Peers, measured in the same run on the same Parquet input:
- distml on one core: one process, with Arrow's and BLAS's own threads limited to one
  (T1 of the speedup; the same run with Arrow's default threads is reported beside it);
- distml's local executor on every core;
- Dask: a LocalCluster of one single-threaded worker process per core, the idiomatic
  dask.dataframe program (read_parquet, mean/std, standardize, to_parquet) with the same
  Parquet writer options as distml. Cluster start-up is not timed.

distml does more than the Dask program: it validates every row, splits train/val/test
(stratified), fits on train only, and writes checksums and a manifest.

Each distml measurement runs in a fresh process, so every configuration starts equally cold
(the pool's workers are new processes each time). The four run in rounds, in a rotated
order: a warm-up round, then REPEATS rounds; every figure is reported as its median and its
spread, and each ratio is taken within a round.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import interleaved, ratios, save, show, stats

ROWS, FEATURES, FILES, REPEATS = 2_000_000, 32, 16, 5


def make_table(root: Path) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = ROWS // FILES
    for i in range(FILES):
        x = rng.standard_normal((per, FEATURES), dtype=np.float32) * 3 + 1
        cols = {f"x{j}": x[:, j] for j in range(FEATURES)} | {"label": rng.integers(0, 4, per)}
        pq.write_table(pa.table(cols), raw / f"part-{i:03d}.parquet")
    return raw


def run_distml(raw: Path, out: Path, mode: str) -> float:
    """Seconds of one ingestion in a fresh process; mode: one-core, in-process or local."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--run", mode, str(raw), str(out)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
    )
    return float(proc.stdout.strip().splitlines()[-1])


def _child(mode: str, raw: str, out: str) -> None:
    import pyarrow
    from threadpoolctl import threadpool_limits

    from distml.config import DataConfig
    from distml.data.ingest import ingest
    from distml.execution import make_executor

    if mode == "one-core":
        threadpool_limits(limits=1)
        pyarrow.set_cpu_count(1)
    data = DataConfig.model_validate(
        {"source": {"path": raw}, "rows_per_partition": ROWS // FILES})
    start = time.perf_counter()
    with make_executor("local", num_workers=os.cpu_count() if mode == "local" else 1) as ex:
        ingest(data, Path(out), seed=0, executor=ex)
    print(time.perf_counter() - start)


def run_dask(client, raw: Path, out: Path) -> None:
    import dask
    import dask.dataframe as dd

    df = dd.read_parquet(str(raw))
    features = [c for c in df.columns if c != "label"]
    mean, std = dask.compute(df[features].mean(), df[features].std(ddof=0))
    scaled = df.assign(**{c: (df[c] - mean[c]) / std[c] for c in features})
    scaled.to_parquet(str(out), write_index=False, use_dictionary=["label"])


def main() -> dict:
    from distributed import Client, LocalCluster

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        root = Path(tmp)
        raw = make_table(root)
        out = root / "out"

        def distml(mode: str):
            return lambda: run_distml(raw, out, mode)

        def dask() -> float:
            start = time.perf_counter()
            run_dask(client, raw, out)
            return time.perf_counter() - start

        def cleared(fn):  # every run writes into an empty folder, its dirty pages flushed
            def run() -> float:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                return fn()
            return run

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            # Rounds of all four, interleaved, after a warm-up round (Dask's workers import
            # pandas and pyarrow in it); the cluster idles while distml runs.
            seconds = interleaved({
                "distml_serial": cleared(distml("one-core")),
                "distml_in_process_default_threads": cleared(distml("in-process")),
                "distml_local": cleared(distml("local")),
                "dask": cleared(dask),
            }, repeats=REPEATS)
    local = seconds["distml_local"]
    result = {
        "rows": ROWS, "features": FEATURES, "input_files": FILES, "workers": workers,
        "repeats": REPEATS,
        "seconds": {k: stats(v) for k, v in seconds.items()},
        "speedup_local_vs_serial": stats(ratios(seconds["distml_serial"], local)),
        "speedup_local_vs_in_process_default_threads": stats(ratios(
            seconds["distml_in_process_default_threads"], local)),
        "ratio_vs_dask": stats(ratios(seconds["dask"], local)),
        "rows_per_s_local": stats([ROWS / t for t in local]),
    }
    save("ingest", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    if not isinstance(r.get("ratio_vs_dask"), dict):  # a file from before the spreads
        return []
    s = r["seconds"]
    return [
        ("ingest 2M x 32", "speedup_local_vs_serial",
         f"{show(r['speedup_local_vs_serial'])} ({show(s['distml_serial'])} s / "
         f"{show(s['distml_local'])} s, {r['workers']} workers; vs one process with "
         f"Arrow's threads: {show(r['speedup_local_vs_in_process_default_threads'])})",
         ">= 1.7"),
        ("ingest 2M x 32", "ratio_vs_dask",
         f"{show(r['ratio_vs_dask'])} (Dask {show(s['dask'])} s)", ">= 1.0"),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        _child(*sys.argv[2:5])
    else:
        print(main())
