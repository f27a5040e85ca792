"""The input pipeline feeding a no-op step, batch 256, against torch's DataLoader and the
limits of moving the same bytes.

Same data for every contender: the training split (about 1.4M rows x 32 float32 features) of
a 2,000,000-row synthetic table ingested by distml into Parquet partitions.
- distml: PartitionLoader with its defaults (memory cache, windowed shuffle, prefetch); a
  fresh loader each round: first epoch (decodes Parquet), then second epoch (cached);
- torch, batched (the idiomatic peer for arrays in memory): a DataLoader whose sampler
  yields whole batches of indices (``batch_size=None``) from distml's own shuffle plan for
  the same epoch, so both deliver the very same batches; the dataset indexes a batch at
  once (one numpy gather). num_workers 0, 1 and 2 are all measured; the best is the peer;
- torch, per row (the naive baseline): a per-row map-style Dataset, shuffle=True,
  num_workers=2 (the common recipe);
- gather (the limit of the loader's work): ``np.take`` of the same epoch's rows, window by
  window in the same order, into a preallocated buffer (mode="clip": unbuffered);
- memcpy: a sequential numpy copy of the same arrays (the limit of moving the bytes).

Every contender runs once per round, in a rotated order, for one warm-up round and REPEATS
measured rounds; each figure is reported as its median and spread. distml's epochs and the
gather are timed whole; the DataLoaders from their second batch on (their worker start-up
left out), with workers over their first WORKER_BATCHES batches and per row over the first
PER_ROW_BATCHES (a whole epoch of those would take minutes).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.common import interleaved, ratios, save, show, stats

BATCH, REPEATS, WORKERS = 256, 5, (0, 1, 2)
# Batches timed per round for the peers that move batches between processes (slow here: a
# full epoch of them would take minutes); the others run a whole epoch.
PER_ROW_BATCHES, WORKER_BATCHES = 400, 1000


class RowDataset(Dataset):
    """The naive peer: one row per ``__getitem__``."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


class BatchDataset(Dataset):
    """The idiomatic peer: ``dataset[indices]`` is a whole batch, one vectorized gather."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: np.ndarray):
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


def plan_windows(loader, epoch: int) -> list[np.ndarray]:
    """distml's shuffle plan for ``epoch`` as row indices into the split's concatenated
    arrays, one permuted index array per window (see distml.data.loader)."""
    offsets = np.concatenate([[0], np.cumsum(loader.sizes)])
    out = []
    for w in loader.plan(epoch):
        idx = np.concatenate([offsets[p] + np.arange(a, b) for p, a, b in w.segments])
        out.append(idx[np.random.default_rng(w.seed).permutation(w.rows)])
    return out


class PlanBatches(Sampler):
    """Batches of indices in distml's order (windows hold whole batches)."""

    def __init__(self, windows: list[np.ndarray], batch: int) -> None:
        self.windows, self.batch = windows, batch

    def __len__(self) -> int:
        return sum(-(-len(w) // self.batch) for w in self.windows)

    def __iter__(self) -> Iterator[np.ndarray]:
        for w in self.windows:
            for b in range(0, len(w), self.batch):
                yield w[b : b + self.batch]


def _rate(batches, limit: int | None = None, *, skip_first: bool = True) -> float:
    """Samples per second over the batches. ``skip_first``: the clock starts after the first
    batch, leaving out a DataLoader's start-up (its worker processes); distml's epochs are
    timed whole, from the call, first window's gather included."""
    start = time.perf_counter()
    it = iter(batches)
    n = 0
    if skip_first:
        next(it)
        start = time.perf_counter()
    for i, (x, _) in enumerate(it):
        n += len(x)
        if limit is not None and i + 1 >= limit:
            break
    return n / (time.perf_counter() - start)


def _gather(x: np.ndarray, y: np.ndarray, windows: list[np.ndarray]) -> Callable[[], float]:
    bx = np.empty((max(map(len, windows)), x.shape[1]), x.dtype)
    by = np.empty(len(bx), y.dtype)

    def run() -> float:
        start = time.perf_counter()
        for idx in windows:  # (mode="raise" would buffer ``out``: a slower limit)
            np.take(x, idx, axis=0, out=bx[: len(idx)], mode="clip")
            np.take(y, idx, out=by[: len(idx)], mode="clip")
        return sum(map(len, windows)) / (time.perf_counter() - start)
    return run


def _memcpy(x: np.ndarray, y: np.ndarray) -> Callable[[], float]:
    dst_x, dst_y = np.empty_like(x), np.empty_like(y)
    np.copyto(dst_x, x)  # faults in dst's pages once, outside any measurement

    def run() -> float:
        start = time.perf_counter()
        np.copyto(dst_x, x)
        np.copyto(dst_y, y)
        return len(x) / (time.perf_counter() - start)
    return run


def main() -> dict:
    from distml.config import DataConfig
    from distml.data.dataset import load_split
    from distml.data.ingest import ingest
    from distml.data.loader import PartitionLoader
    from distml.execution import make_executor

    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        data = DataConfig.model_validate({
            "source": {"type": "synthetic:classification", "n_samples": 2_000_000,
                       "n_features": 32, "n_classes": 4},
            "rows_per_partition": 125_000,
        })
        with make_executor("local") as ex:
            manifest = ingest(data, Path(tmp) / "data", seed=0, executor=ex)
        x, y = load_split(manifest, "train")
        plan_loader = PartitionLoader(manifest, "train", batch_size=BATCH, seed=0)
        windows = plan_windows(plan_loader, 1)  # the epoch distml's cached figure runs
        _check_same_batches(plan_loader, x, y, windows)
        second: list[float] = []

        def distml_epochs() -> float:  # the first epoch; the cached second one is kept aside
            loader = PartitionLoader(manifest, "train", batch_size=BATCH, seed=0)
            cold = _rate(loader.batches(0), skip_first=False)
            second.append(_rate(loader.batches(1), skip_first=False))
            return cold

        def batched(workers: int) -> Callable[[], float]:
            return lambda: _rate(DataLoader(
                BatchDataset(x, y), sampler=PlanBatches(windows, BATCH), batch_size=None,
                num_workers=workers), WORKER_BATCHES if workers else None)

        contenders = {
            "distml_first_epoch": distml_epochs,
            **{f"torch_batched_workers_{w}": batched(w) for w in WORKERS},
            "torch_per_row": lambda: _rate(DataLoader(
                RowDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=2),
                PER_ROW_BATCHES),
            "gather": _gather(x, y, windows),
            "memcpy": _memcpy(x, y),
        }
        rates = interleaved(contenders, repeats=REPEATS)
        rates["distml_cached_epoch"] = second[1:]  # (the warm-up round's is dropped)
    return _result(rates, x, y)


def _check_same_batches(loader, x: np.ndarray, y: np.ndarray, windows: list[np.ndarray]
                        ) -> None:
    """The batched peer's first batches are distml's, row for row: the same plan."""
    ours = loader.batches(1)
    theirs = iter(DataLoader(BatchDataset(x, y), sampler=PlanBatches(windows, BATCH),
                             batch_size=None))
    for _ in range(3):
        (xa, ya), (xb, yb) = next(ours), next(theirs)
        if not (torch.equal(xa, xb) and torch.equal(ya, yb)):
            raise AssertionError("the batched DataLoader peer does not follow distml's plan")
    ours.close()


def _result(rates: dict[str, list[float]], x: np.ndarray, y: np.ndarray) -> dict:
    batched = {w: stats(rates[f"torch_batched_workers_{w}"])["median"] for w in WORKERS}
    best = max(batched, key=batched.get)
    cached = rates["distml_cached_epoch"]
    row_bytes = x.itemsize * x.shape[1] + y.itemsize
    result = {
        "rows": int(len(x)), "features": int(x.shape[1]), "batch_size": BATCH,
        "repeats": REPEATS,
        "samples_per_s": {k: stats(v) for k, v in rates.items()},
        "batched_dataloader_best_num_workers": best,
        "ratio_vs_batched_dataloader": stats(ratios(
            cached, rates[f"torch_batched_workers_{best}"])),
        "ratio_vs_torch_dataloader": stats(ratios(cached, rates["torch_per_row"])),
        "ratio_vs_torch_dataloader_first_epoch": stats(ratios(
            rates["distml_first_epoch"], rates["torch_per_row"])),
        "fraction_of_gather": stats(ratios(cached, rates["gather"])),
        "fraction_of_memcpy": stats(ratios(cached, rates["memcpy"])),
        "bytes_per_s": {k: stats([r * row_bytes for r in rates[k]])
                        for k in ("distml_cached_epoch", "gather", "memcpy")},
    }
    save("loader", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    s = r["samples_per_s"]
    if "ratio_vs_batched_dataloader" not in r:  # a results file from before the repeats
        return []
    best = r["batched_dataloader_best_num_workers"]
    per_worker = ", ".join(f"{w}: {show(s[f'torch_batched_workers_{w}'], '{:.2f}', 1e-6)}"
                           for w in WORKERS)
    m = "{:.2f}"
    return [
        ("loader, batch 256", "ratio_vs_batched_dataloader",
         f"{show(r['ratio_vs_batched_dataloader'])} (distml cached "
         f"{show(s['distml_cached_epoch'], m, 1e-6)} M samples/s; DataLoader over whole "
         f"batches of the same plan, best num_workers={best}; M samples/s by num_workers: "
         f"{per_worker})", "reported"),
        ("loader, batch 256", "ratio_vs_torch_dataloader (naive: per row, 2 workers)",
         f"{show(r['ratio_vs_torch_dataloader'], '{:.1f}')} (per-row DataLoader "
         f"{show(s['torch_per_row'], m, 1e-6)} M samples/s; distml first epoch "
         f"{show(s['distml_first_epoch'], m, 1e-6)} M)", ">= 10"),
        ("loader, batch 256", "fraction_of_gather",
         f"{show(r['fraction_of_gather'])} (np.take of the same rows, window by window: "
         f"{show(s['gather'], m, 1e-6)} M rows/s)", ">= 0.5"),
        ("loader, batch 256", "fraction_of_memcpy",
         f"{show(r['fraction_of_memcpy'])} (sequential copy "
         f"{show(r['bytes_per_s']['memcpy'], '{:.1f}', 1e-9)} GB/s)", "reported"),
    ]


if __name__ == "__main__":
    print(main())
