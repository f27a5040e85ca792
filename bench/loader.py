"""The input pipeline feeding a no-op step, batch 256, against torch's DataLoader.

Same data for every peer: the training split (about 1.4M rows x 32 float32 features) of a
2,000,000-row synthetic table ingested by distml into Parquet partitions.
- distml: PartitionLoader with its defaults (memory cache, windowed shuffle, prefetch),
  first epoch (decodes Parquet) and second epoch (cached);
- torch: DataLoader over a per-row map-style Dataset holding the same arrays in memory,
  shuffle=True, num_workers=2 (the common recipe);
- memcpy: a plain numpy copy of the same arrays, the ceiling for moving the bytes.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.common import save

BATCH, TORCH_BATCHES = 256, 1500


class RowDataset(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def _rate(batches, limit: int | None = None) -> tuple[float, int]:
    """Samples per second over the batches (after the first, which includes start-up)."""
    it = iter(batches)
    next(it)
    n, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(it):
        n += len(x)
        if limit is not None and i + 1 >= limit:
            break
    return n / (time.perf_counter() - start), n


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
        loader = PartitionLoader(manifest, "train", batch_size=BATCH, seed=0)
        cold, n_cold = _rate(loader.batches(0))
        warm, n_warm = _rate(loader.batches(1))
        stall = loader.wait_seconds

        x, y = load_split(manifest, "train")
        torch_loader = DataLoader(RowDataset(x, y), batch_size=BATCH, shuffle=True,
                                  num_workers=2, persistent_workers=False)
        peer, n_peer = _rate(torch_loader, TORCH_BATCHES)

        dst_x, dst_y = np.empty_like(x), np.empty_like(y)
        copies = []
        for _ in range(6):  # the first copy also faults in dst's pages: not counted
            start = time.perf_counter()
            np.copyto(dst_x, x)
            np.copyto(dst_y, y)
            copies.append(time.perf_counter() - start)
        memcpy_bytes_per_s = (x.nbytes + y.nbytes) / statistics.median(copies[1:])
    row_bytes = x.itemsize * x.shape[1] + y.itemsize
    result = {
        "rows": int(len(x)), "features": int(x.shape[1]), "batch_size": BATCH,
        "samples_per_s": {"distml_first_epoch": cold, "distml_cached_epoch": warm,
                          "torch_dataloader": peer},
        "samples_measured": {"distml_first_epoch": n_cold, "distml_cached_epoch": n_warm,
                             "torch_dataloader": n_peer},
        "ratio_vs_torch_dataloader": warm / peer,
        "ratio_vs_torch_dataloader_first_epoch": cold / peer,
        "distml_bytes_per_s": warm * row_bytes,
        "memcpy_bytes_per_s": memcpy_bytes_per_s,
        "fraction_of_memcpy": warm * row_bytes / memcpy_bytes_per_s,
        "consumer_wait_seconds_two_epochs": stall,
    }
    save("loader", result)
    return result


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    s = r["samples_per_s"]
    return [
        ("loader, batch 256", "ratio_vs_torch_dataloader",
         f"{r['ratio_vs_torch_dataloader']:.1f} ({s['distml_cached_epoch']:,.0f} vs "
         f"{s['torch_dataloader']:,.0f} samples/s; first epoch {s['distml_first_epoch']:,.0f})",
         ">= 10"),
        ("loader, batch 256", "fraction_of_memcpy", f"{r['fraction_of_memcpy']:.2f}", "reported"),
    ]


if __name__ == "__main__":
    print(main())
