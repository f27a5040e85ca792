"""Parallel preprocessing: fit + standardize + write of a 2,000,000 x 32 synthetic table.

Peers, measured in the same run on the same Parquet input:
- distml on one core: one process, with Arrow's and BLAS's own threads limited to one
  (T1 of the speedup; the same run with Arrow's default threads is reported beside it);
- distml's local executor on every core;
- Dask: a LocalCluster of one single-threaded worker process per core, the idiomatic
  dask.dataframe program (read_parquet, mean/std, standardize, to_parquet) with the same
  Parquet writer options as distml. Cluster start-up is not timed.
- Ray Data: the program its docs show (read_parquet, mean/std, map_batches, write_parquet)
  on a local Ray with one CPU per core; Spark: the DataFrame program (read.parquet,
  mean/stddev_pop, select, write.parquet) on ``local[N]``, N the cores. Start-up not timed.
- distml's local executor reading its source from, and publishing its output to, a local
  S3 server (moto's server mode on loopback, started here): ``s3_over_local_seconds`` is
  what the object store adds to the same job (median of per-round differences).

``DISTML_BENCH_QUICK=1``: 200,000 rows, one round, nothing saved (a check that it runs).

distml does more than the Dask program: it validates every row, splits train/val/test
(stratified), fits on train only, and writes checksums and a manifest.

Each distml measurement runs in a fresh process, so every configuration starts equally cold
(the pool's workers are new processes each time). The four run in rounds, in a rotated
order: a warm-up round, then REPEATS rounds; every figure is reported as its median and its
spread, and each ratio is taken within a round.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute in the Ray Data peer
import pyarrow.parquet as pq

from bench.common import QUICK, interleaved, ratios, save, show, stats

ROWS, FEATURES, FILES, REPEATS = (200_000, 32, 16, 1) if QUICK else (2_000_000, 32, 16, 5)


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


def run_distml(raw: Path | str, out: Path | str, mode: str, env: dict | None = None) -> float:
    """Seconds of one ingestion in a fresh process; mode: one-core, in-process, local or s3
    (local, with ``raw`` and ``out`` storage URLs, the output published there)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ingest", "--run", mode, str(raw), str(out)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1],
        env={**os.environ, **(env or {})},
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
    from distml import storage

    data = DataConfig.model_validate(
        {"source": {"path": raw}, "rows_per_partition": ROWS // FILES})
    root = storage.local_path(out)  # a URL's local mirror
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    workers = os.cpu_count() if mode in ("local", "s3") else 1
    with make_executor("local", num_workers=workers) as ex:
        ingest(data, root, seed=0, executor=ex)
    if mode == "s3":
        storage.publish_dir(root, out)
    print(time.perf_counter() - start)


def run_dask(client, raw: Path, out: Path) -> None:
    import dask
    import dask.dataframe as dd

    df = dd.read_parquet(str(raw))
    features = [c for c in df.columns if c != "label"]
    mean, std = dask.compute(df[features].mean(), df[features].std(ddof=0))
    scaled = df.assign(**{c: (df[c] - mean[c]) / std[c] for c in features})
    scaled.to_parquet(str(out), write_index=False, use_dictionary=["label"])


def run_ray_data(raw: Path, out: Path) -> None:
    import ray

    ds = ray.data.read_parquet(str(raw))
    features = [c for c in ds.columns() if c != "label"]
    mean, std = ds.mean(features), ds.std(features, ddof=0)

    def standardize(batch: pa.Table) -> pa.Table:
        cols = {c: pa.compute.divide(pa.compute.subtract(batch[c], mean[f"mean({c})"]),
                                     std[f"std({c})"]) for c in features}
        return pa.table({**cols, "label": batch["label"]})

    ds.map_batches(standardize, batch_format="pyarrow").write_parquet(str(out))


def run_spark(spark, raw: Path, out: Path) -> None:
    from pyspark.sql import functions as sf

    df = spark.read.parquet(str(raw))
    features = [c for c in df.columns if c != "label"]
    row = df.select([sf.mean(c).alias(f"m{c}") for c in features]
                    + [sf.stddev_pop(c).alias(f"s{c}") for c in features]).first()
    df.select([((sf.col(c) - row[f"m{c}"]) / row[f"s{c}"]).alias(c) for c in features]
              + ["label"]).write.mode("overwrite").parquet(str(out))


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on a free loopback port, with a bucket; yields the client's env."""
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(300):
            try:
                boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="b",
                             aws_secret_access_key="b", region_name="us-east-1"
                             ).create_bucket(Bucket="bench")
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        proc.wait(20)


def _upload(raw: Path, env: dict[str, str]) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="b",
                          aws_secret_access_key="b", region_name="us-east-1")
    for f in sorted(raw.iterdir()):
        client.upload_file(str(f), "bench", f"raw/{f.name}")
    return "s3://bench/raw/"


@contextlib.contextmanager
def engines(workers: int) -> Iterator[tuple[Any, Any]]:
    """A Dask client and a SparkSession, with Ray started; all stopped on exit."""
    import ray
    from distributed import Client, LocalCluster
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    spark = (SparkSession.builder.master(f"local[{workers}]").appName("bench-ingest")
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client, spark
    finally:
        spark.stop()
        ray.shutdown()


def main() -> dict:

    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        root = Path(tmp)
        raw = make_table(root)
        out = root / "out"

        def distml(mode: str):
            return lambda: run_distml(raw, out, mode)

        def timed(fn, *args):
            def run() -> float:
                start = time.perf_counter()
                fn(*args)
                return time.perf_counter() - start
            return run

        def cleared(fn):  # every run writes into an empty folder, its dirty pages flushed
            def run() -> float:
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                return fn()
            return run

        with engines(workers) as (client, spark), s3_server() as env:
            remote = _upload(raw, env)
            env["DISTML_CACHE"] = str(root / "cache")
            # Rounds of all, interleaved, after a warm-up round (Dask's workers import
            # pandas and pyarrow in it); the engines idle while the others run.
            seconds = interleaved({
                "distml_serial": cleared(distml("one-core")),
                "distml_in_process_default_threads": cleared(distml("in-process")),
                "distml_local": cleared(distml("local")),
                "distml_s3": lambda: run_distml(remote, "s3://bench/out", "s3", env),
                "dask": cleared(timed(run_dask, client, raw, out)),
                "ray_data": cleared(timed(run_ray_data, raw, out)),
                "spark": cleared(timed(run_spark, spark, raw, out)),
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
        "ratio_vs_ray_data": stats(ratios(seconds["ray_data"], local)),
        "ratio_vs_spark": stats(ratios(seconds["spark"], local)),
        "s3_over_local_seconds": stats([s - t for s, t in zip(seconds["distml_s3"], local,
                                                              strict=True)]),
        "rows_per_s_local": stats([ROWS / t for t in local]),
    }
    if not QUICK:
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
    ] + ([] if "ratio_vs_spark" not in r else [  # results from before these peers
        ("ingest 2M x 32", "ratio_vs_spark",
         f"{show(r['ratio_vs_spark'])} (Spark local[{r['workers']}] {show(s['spark'])} s)",
         ">= 1.2"),
        ("ingest 2M x 32", "ratio_vs_ray_data",
         f"{show(r['ratio_vs_ray_data'])} (Ray Data {show(s['ray_data'])} s)", ">= 1.2"),
        ("ingest 2M x 32", "s3_over_local_seconds",
         f"{show(r['s3_over_local_seconds'])} s (local S3 {show(s['distml_s3'])} s)",
         "reported"),
    ])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--run"]:
        _child(*sys.argv[2:5])
    else:
        print(main())
