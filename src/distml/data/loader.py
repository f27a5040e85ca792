"""The training input pipeline: a rank's share of a split's partitions, as whole batches.

An epoch's order is planned from the manifest alone, as a pure function of
(seed, epoch, rank, world size):

  1. the partitions are permuted (seeded), and their rows laid end to end;
  2. each rank takes one contiguous block of that sequence, of equal size on every rank
     (``remainder: drop`` drops the last rows of the epoch, ``pad`` wraps around to its
     start), so every row is seen exactly once per epoch across ranks, and a rank reads
     about 1/world_size of the partitions;
  3. the block is cut into shuffle windows of whole batches; each window is permuted.

Running the plan: partitions are decoded in a thread pool ahead of use (interleave), each
window is gathered with one vectorized copy, batches are views of it (no per-sample Python),
an optional map function runs on each batch in the pool, and a background thread keeps
about ``prefetch_batches`` ready, a window at a time. Because the plan is pure, the
loader's state is only (epoch, batch index): a resumed run sees exactly the batches an
uninterrupted run would.

Elastic jobs (``train.parallel.min_nodes``/``max_nodes``) deal another way, so that the
world size may change mid-epoch (``distml.data.elastic``): the epoch's order is one global
sequence of row ids, the same at every world size, and optimizer step ``s`` takes its rows
``[s*G, (s+1)*G)`` (``G`` the global batch), split evenly among the ranks there are. After a
resize the rest of the epoch is simply the rest of that sequence, dealt among the new ranks.
"""

from __future__ import annotations

import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distml.config import LoaderConfig
from distml.data.dataset import Manifest, read_partition
from distml.data.elastic import ElasticDeal
from distml.data.teacher_logits import aligned_logits, pack_targets, read_row_ids
from distml.errors import DataError
from distml.imports import load_object

Batch = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Window:
    """Rows shuffled together: segments (partition, start, stop) and the permutation seed."""

    segments: tuple[tuple[int, int, int], ...]
    seed: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(b - a for _, a, b in self.segments)


def rank_rows(total: int, world_size: int, remainder: str) -> int:
    """Rows each rank sees per epoch."""
    return total // world_size if remainder == "drop" else math.ceil(total / world_size)


def plan_epoch(
    sizes: list[int], *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
    remainder: str, window_rows: int,
) -> list[Window]:
    """This rank's windows for one epoch (see the module docstring)."""
    order = (np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle
             else np.arange(len(sizes)))
    total = sum(sizes)
    per_rank = rank_rows(total, world_size, remainder)
    bounds = np.concatenate([[0], np.cumsum([sizes[p] for p in order])])

    def segments(lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Global positions [lo, hi) -> segments; positions past the end wrap (padding)."""
        out = []
        while lo < hi:
            pos = lo % total
            i = int(np.searchsorted(bounds, pos, side="right")) - 1
            take = min(hi - lo, int(bounds[i + 1]) - pos)
            start = pos - int(bounds[i])
            out.append((int(order[i]), start, start + take))
            lo += take
        return out

    first = rank * per_rank
    return [
        Window(tuple(segments(lo, min(lo + window_rows, first + per_rank))),
               (seed, epoch, rank, w))
        for w, lo in enumerate(range(first, first + per_rank, window_rows))
    ]


class PartitionLoader:
    """Batches of one split (or several, read as one) for one rank; ``batches(epoch,
    start)`` is all a trainer needs."""

    def __init__(
        self,
        manifest: Manifest,
        split: str | tuple[str, ...],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        config: LoaderConfig | None = None,
        drop_last: bool = False,
        teacher_logits: Path | None = None,
        elastic: ElasticDeal | None = None,
    ) -> None:
        self.manifest = manifest
        # A store of teacher outputs (distml.data.teacher_logits): each row's targets then
        # carry its teacher's logits, so shuffling and sharding keep them together.
        self.teacher_logits = teacher_logits
        self.drop_last = drop_last  # no short last batch (a pipeline needs fixed shapes)
        # Several splits read as one (a distilled student's training and unlabelled rows).
        parts = [p for name in ((split,) if isinstance(split, str) else split)
                 for p in manifest.partitions(name)]
        self.parts = [p["path"] for p in parts]
        self.sizes = [p["rows"] for p in parts]
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.config = config or LoaderConfig()
        # Windows hold whole batches, so a batch never straddles two windows.
        self.window_rows = math.ceil(self.config.shuffle_window / batch_size) * batch_size
        self.rows_per_epoch = rank_rows(sum(self.sizes), world_size, self.config.remainder)
        self.map_fn: Callable[[np.ndarray, np.ndarray], Batch] | None = (
            load_object(self.config.map_fn, what="data.loader.map_fn")
            if self.config.map_fn else None
        )
        self._cache: dict[int, Batch] = {}
        # The memory cache keeps every decoded partition at its place in one array per
        # split (allocated on the first decode; pages become resident as partitions land),
        # so a window is one np.take of row indices, wherever its rows come from.
        self._offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self._rows: Batch | None = None
        self._rows_lock = threading.Lock()
        # Removed with the loader (or at exit): the cache is this process's scratch space.
        self._disk_dir = (tempfile.TemporaryDirectory(prefix="distml-cache-")
                          if self.config.cache == "disk" else None)
        self._disk_cache = Path(self._disk_dir.name) if self._disk_dir else None
        self.wait_seconds = 0.0  # time the consumer spent blocked on the next batch
        self.elastic = elastic
        if elastic is not None:
            elastic.check(sum(self.sizes), world_size)
        # Elastic jobs count how often each row of the split was yielded (this epoch, this
        # process): the trainer sums it over ranks to show each row is used once an epoch.
        self.seen = np.zeros(sum(self.sizes), np.int32) if elastic is not None else None

    def __len__(self) -> int:
        """Batches per epoch on this rank (the last one may be short unless drop_last)."""
        if self.elastic is not None:
            return self.elastic.steps(sum(self.sizes)) * self.elastic.accum
        whole = self.rows_per_epoch / self.batch_size
        return math.floor(whole) if self.drop_last else math.ceil(whole)

    def plan(self, epoch: int) -> list[Window]:
        return plan_epoch(
            self.sizes, epoch=epoch, seed=self.seed, rank=self.rank,
            world_size=self.world_size, shuffle=self.config.shuffle,
            remainder=self.config.remainder, window_rows=self.window_rows,
        )

    # -- running the plan ----------------------------------------------------------------------

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from batch index ``start`` on, as (B, ...) tensors.

        The background thread works a window at a time (decode, gather, map) and wakes once
        per window: waking it for every batch would preempt the training step's own threads.
        """
        if self.elastic is not None:
            yield from self._elastic_batches(epoch, start)
            return
        per_window = self.window_rows // self.batch_size
        windows = self.plan(epoch)[start // per_window :]
        skip = start % per_window
        with ThreadPoolExecutor(self.config.num_threads, thread_name_prefix="distml-io") as pool:
            produced = self._produce(windows, skip, pool)
            if self.config.prefetch_batches:
                depth = math.ceil(self.config.prefetch_batches / per_window)
                produced = _prefetch(produced, depth)
            while True:
                t = time.perf_counter()
                window = next(produced, None)
                self.wait_seconds += time.perf_counter() - t
                if window is None:
                    return
                for x, y in window:
                    if self.drop_last and len(x) < self.batch_size:
                        return
                    yield torch.from_numpy(x), torch.from_numpy(y)

    def _elastic_batches(self, epoch: int, start: int
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An elastic job's batches: this rank's share of each step's global rows, from
        micro-batch ``start`` (a step boundary) on; no read-ahead."""
        deal = self.elastic
        ids = deal.epoch_ids(self.sizes, epoch=epoch, seed=self.seed,
                             shuffle=self.config.shuffle, window_rows=self.window_rows)
        for part in deal.rank_batches(ids, start=start, rank=self.rank,
                                      world_size=self.world_size):
            t = time.perf_counter()
            x, y = self._rows_of(part)
            if self.map_fn is not None:
                x, y = self.map_fn(x, y)
            self.wait_seconds += time.perf_counter() - t
            self.seen[part] += 1  # ids within a step are distinct
            yield torch.from_numpy(x), torch.from_numpy(y)

    def _rows_of(self, ids: np.ndarray) -> Batch:
        """The split's rows ``ids`` (indices into the partitions laid end to end), in order."""
        pids = np.searchsorted(self._offsets, ids, side="right") - 1
        x = y = None
        for pid in np.unique(pids):
            px, py = self._decode(int(pid))
            sel = pids == pid
            local = ids[sel] - self._offsets[pid]
            if x is None:
                x = np.empty((len(ids), *px.shape[1:]), px.dtype)
                y = np.empty((len(ids), *py.shape[1:]), py.dtype)
            x[sel], y[sel] = np.take(px, local, axis=0), np.take(py, local, axis=0)
        return x, y

    def _produce(self, windows: list[Window], skip: int, pool: ThreadPoolExecutor
                 ) -> Iterator[list[Batch]]:
        """Each window's batches (views of its gathered rows, mapped if asked); the next
        window's partitions are decoded and its permutation drawn in the pool meanwhile."""
        decoding: dict[int, Future[Batch]] = {}

        def decode_ahead(window: Window) -> None:  # interleave: next window's partitions
            for pid, _, _ in window.segments:
                if pid not in decoding and pid not in self._cache:
                    decoding[pid] = pool.submit(self._decode, pid)

        def shuffle_ahead(i: int) -> Future[np.ndarray] | None:
            # Drawing a window's permutation costs a quarter of gathering it: it is drawn
            # in the pool (numpy releases the GIL) while the previous window is gathered.
            if not self.config.shuffle or i >= len(windows):
                return None
            return pool.submit(self._order, windows[i])

        order = shuffle_ahead(0)
        for i, window in enumerate(windows):
            decode_ahead(window)
            if i + 1 < len(windows):
                decode_ahead(windows[i + 1])
            order, next_order = order, shuffle_ahead(i + 1)
            x, y = self._gather(window, decoding, order.result() if order else None)
            order = next_order
            bounds = range(skip * self.batch_size if i == 0 else 0, len(x), self.batch_size)
            batches = [(x[b : b + self.batch_size], y[b : b + self.batch_size]) for b in bounds]
            if self.map_fn is not None:
                batches = list(pool.map(lambda xy: self.map_fn(*xy), batches))
            yield batches
            for pid in [p for p in decoding if not self._needed(p, windows[i + 1 : i + 2])]:
                decoding.pop(pid)  # keep memory to the windows in flight

    @staticmethod
    def _needed(pid: int, windows: list[Window]) -> bool:
        return any(pid == p for w in windows for p, _, _ in w.segments)

    def _order(self, window: Window) -> np.ndarray:
        """Where the window's rows come from, in batch order: row k is row perm[k] of its
        segments laid end to end (perm drawn from the window's seed). With the memory cache,
        as indices into its one array; otherwise as perm itself."""
        perm = np.random.default_rng(window.seed).permutation(window.rows)
        if self.config.cache != "memory":
            return perm
        at = self._offsets
        if len(window.segments) == 1:
            pid, a, _ = window.segments[0]
            perm += at[pid] + a
            return perm
        return np.take(np.concatenate([np.arange(at[pid] + a, at[pid] + b)
                                       for pid, a, b in window.segments]), perm)

    def _gather(self, window: Window, decoding: dict[int, Future[Batch]],
                order: np.ndarray | None = None) -> Batch:
        """The window's rows in batch order (see _order). Every byte is moved once, by
        np.take (numpy's fancy indexing is about twice as slow): from the memory cache's
        one array; otherwise a lone segment is gathered, and several are scattered to
        their places (row j goes to inverse_perm[j]) rather than concatenated first."""
        parts = []
        for pid, a, b in window.segments:
            x, y = self._cache[pid] if pid in self._cache else decoding[pid].result()
            parts.append((x[a:b], y[a:b]))
        if not self.config.shuffle:
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        perm = self._order(window) if order is None else order
        if self.config.cache == "memory":  # each segment's rows are in place in one array
            return (np.take(self._rows[0], perm, axis=0), np.take(self._rows[1], perm, axis=0))
        if len(parts) == 1:
            return np.take(parts[0][0], perm, axis=0), np.take(parts[0][1], perm, axis=0)
        inverse = np.empty_like(perm)
        inverse[perm] = np.arange(len(perm))
        x0, y0 = parts[0]
        x = np.empty((window.rows, *x0.shape[1:]), x0.dtype)
        y = np.empty((window.rows, *y0.shape[1:]), y0.dtype)
        at = 0
        for px, py in parts:
            to = inverse[at : at + len(px)]
            x[to], y[to] = px, py
            at += len(px)
        return x, y

    def _decode(self, pid: int) -> Batch:
        """Read one partition, through the cache when there is one."""
        if pid in self._cache:
            return self._cache[pid]
        if self._disk_cache is not None:
            xf, yf = self._disk_cache / f"{pid}.x.npy", self._disk_cache / f"{pid}.y.npy"
            if not xf.exists():
                x, y = self._read(pid)
                np.save(yf, y)
                np.save(xf, x)  # x last: its presence means both are complete
            batch = np.load(xf, mmap_mode="r"), np.load(yf, mmap_mode="r")
        else:
            batch = self._read(pid)
        if self.config.cache == "memory":
            batch = self._keep(pid, batch)
            self._cache[pid] = batch
        return batch

    def _keep(self, pid: int, batch: Batch) -> Batch:
        """Copy a decoded partition to its place in the split's one array (see __init__)."""
        x, y = batch
        with self._rows_lock:
            if self._rows is None:
                total = int(self._offsets[-1])
                self._rows = (np.empty((total, *x.shape[1:]), x.dtype),
                              np.empty((total, *y.shape[1:]), y.dtype))
        lo, hi = int(self._offsets[pid]), int(self._offsets[pid + 1])
        if hi - lo != len(x):
            raise DataError(f"partition {self.parts[pid]} has {len(x)} rows, its manifest "
                            f"says {hi - lo}; ingest again")
        self._rows[0][lo:hi] = x
        self._rows[1][lo:hi] = y
        return self._rows[0][lo:hi], self._rows[1][lo:hi]

    def _read(self, pid: int) -> Batch:
        """One partition's inputs and targets (with its rows' teacher logits, if any)."""
        x, y = read_partition(self.manifest, self.parts[pid])
        if self.teacher_logits is None:
            return x, y
        ids = read_row_ids(self.manifest, self.parts[pid])
        return x, pack_targets(y, aligned_logits(self.teacher_logits, self.parts[pid], ids))


_DONE = object()


def _prefetch(source: Iterator[list[Batch]], depth: int) -> Iterator[list[Batch]]:
    """Run ``source`` in a background thread, ``depth`` items ahead; errors re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=fill, name="distml-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
