"""The input pipeline part by part, as the tf.data guide measures it: a training step that
takes a fixed time (a sleep, as an accelerator's step leaves the CPU free), a map function
that costs something (a jitter augmentation), and the loader's parts switched on one at a
time (naive -> + prefetch -> + interleave and parallel map -> + cache) and each switched off
from the full pipeline, against the ideal: the step alone, the data costing nothing.

Data: a synthetic 400,000 x 64 table ingested into 16 Parquet partitions; the training
split, batch 1,024. Without the cache every epoch decodes the Parquet again. One epoch per
configuration per round (the cache's configurations: their second epoch, the first filling
it); REPEATS rounds after a warm-up, configurations in a rotated order; fractions of the
ideal are taken within a round.

distml has one knob for interleave and map parallelism (``num_threads``: the pool that
decodes partitions ahead and runs the map function), so they are switched together.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import interleaved, ratios, save, show, stats

ROWS, FEATURES, PARTITIONS, BATCH, REPEATS = 400_000, 64, 16, 1024, 5
STEP_S = 0.002  # the simulated training step per batch
JITTER = "bench.loader_parts:jitter"

NAIVE = {"prefetch_batches": 0, "num_threads": 1, "cache": "none", "map_fn": JITTER}
FULL = {"prefetch_batches": 8, "num_threads": 2, "cache": "memory", "map_fn": JITTER}
CONFIGS: dict[str, dict] = {
    "naive": NAIVE,
    "+prefetch": {**NAIVE, "prefetch_batches": 8},
    "+interleave+parallel_map": {**NAIVE, "prefetch_batches": 8, "num_threads": 2},
    "+cache (all on)": FULL,
    "all but prefetch": {**FULL, "prefetch_batches": 0},
    "all but interleave+parallel_map": {**FULL, "num_threads": 1},
    "all but cache": {**FULL, "cache": "none"},
}


def jitter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian noise and a random per-row scale: about a millisecond per batch here, in
    numpy (which releases the GIL, so map threads can overlap)."""
    rng = np.random.default_rng(int(x[0, 0] * 1e6) & 0xFFFF)
    noisy = x + 0.1 * rng.standard_normal(x.shape, dtype=np.float32)
    return noisy * rng.uniform(0.9, 1.1, (len(x), 1)).astype(np.float32), y


def _epoch_rate(batches) -> float:
    """Samples/s of one epoch fed to the fixed-time step."""
    start, n = time.perf_counter(), 0
    for x, _ in batches:
        time.sleep(STEP_S)
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> dict:
    from distml.config import DataConfig, LoaderConfig
    from distml.data.ingest import ingest
    from distml.data.loader import PartitionLoader
    from distml.execution import make_executor

    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        data = DataConfig.model_validate({
            "source": {"type": "synthetic:classification", "n_samples": ROWS,
                       "n_features": FEATURES, "n_classes": 4},
            "rows_per_partition": ROWS // PARTITIONS,
        })
        with make_executor("local") as ex:
            manifest = ingest(data, Path(tmp) / "data", seed=0, executor=ex)
        batches_per_epoch = len(PartitionLoader(manifest, "train", batch_size=BATCH, seed=0))

        def configured(options: dict) -> Callable[[], float]:
            def run() -> float:
                loader = PartitionLoader(manifest, "train", batch_size=BATCH, seed=0,
                                         config=LoaderConfig(**options))
                if options["cache"] == "memory":
                    for _ in loader.batches(0):  # fills the cache
                        pass
                return _epoch_rate(loader.batches(1))
            return run

        def ideal() -> float:  # the step alone: what a pipeline costing nothing would give
            start = time.perf_counter()
            for _ in range(batches_per_epoch):
                time.sleep(STEP_S)
            return batches_per_epoch * BATCH / (time.perf_counter() - start)

        rates = interleaved({"ideal": ideal, **{k: configured(v) for k, v in CONFIGS.items()}},
                            repeats=REPEATS)
    result = {
        "rows": ROWS, "features": FEATURES, "partitions": PARTITIONS, "batch_size": BATCH,
        "step_seconds": STEP_S, "map_fn": JITTER, "repeats": REPEATS, "configs": CONFIGS,
        "samples_per_s": {k: stats(v) for k, v in rates.items()},
        "fraction_of_ideal": {k: stats(ratios(rates[k], rates["ideal"])) for k in CONFIGS},
    }
    save("loader_parts", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    s, f = r["samples_per_s"], r["fraction_of_ideal"]
    parts = "; ".join(f"{k} {show(s[k], '{:.0f}', 1e-3)} ({show(f[k])})" for k in r["configs"])
    return [("loader parts, batch 1024, jitter map, 2 ms step",
             "k samples/s (fraction of the ideal) per configuration",
             f"ideal {show(s['ideal'], '{:.0f}', 1e-3)}; {parts}", "reported")]


if __name__ == "__main__":
    print(main())
