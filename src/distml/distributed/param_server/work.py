"""The work queue: units of work cut from the training split, handed to whichever worker
asks next, so a fast worker takes more of them (that is the load balancing).

A work item is a fixed slice of one partition: ``batches_per_item`` worker batches of
consecutive rows. Each epoch visits every item once, in a seeded order, its rows shuffled
by a seed of (seed, epoch, item): what an item contains never depends on who processes it.

``WorkQueue`` is the accounting, pure and checkpointed: pending, in flight (per worker),
and the completions of the epoch. A dead worker's item goes back to the front of the
queue; an item is complete once, when the worker that holds it reports it done, so every
item of an epoch is completed exactly once (the gradients of a dead worker's partial item
were applied already: they are counted as re-done batches, not undone). A worker whose
gradient a sync step dropped (a backup worker's, late) stops its item there and hands it
back (``partial``): it goes to the back of the queue, to be resumed from that batch by
whoever takes it, so each of its batches is applied once.
``Coordinator`` wraps it for the server threads: workers block in it while the epoch's
last items are still in flight elsewhere (one may come back if its worker dies), and it
tells the training loop when an epoch is over. Workers may join a running job (``join``)
and leave it (``leave``: scaled down, its finished item reported; ``lost``: dead, its item
re-queued); each change is a membership event (time, worker, what, the workers before and
after).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distml.config import LoaderConfig
from distml.data.dataset import Manifest, read_partition
from distml.imports import load_object


@dataclass(frozen=True)
class Item:
    partition: int
    start: int
    stop: int


def plan_items(sizes: list[int], rows_per_item: int) -> list[Item]:
    """Every row of every partition in exactly one item; a partition's last item may be
    short."""
    return [Item(p, a, min(a + rows_per_item, n))
            for p, n in enumerate(sizes) for a in range(0, n, rows_per_item)]


class ItemReader:
    """A work item's batches; partitions decoded once and kept (``cache: memory``)."""

    def __init__(self, manifest: Manifest, *, batch_size: int, batches_per_item: int,
                 seed: int, config: LoaderConfig) -> None:
        self.manifest = manifest
        parts = manifest.partitions("train")
        self.paths = [p["path"] for p in parts]
        self.items = plan_items([p["rows"] for p in parts], batch_size * batches_per_item)
        self.batch_size, self.seed, self.config = batch_size, seed, config
        self.map_fn: Callable | None = (load_object(config.map_fn, what="data.loader.map_fn")
                                        if config.map_fn else None)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batches(self, epoch: int, item_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        item = self.items[item_id]
        x, y = self._partition(item.partition)
        x, y = x[item.start:item.stop], y[item.start:item.stop]
        if self.config.shuffle:
            perm = np.random.default_rng([self.seed, epoch, item_id]).permutation(len(x))
            x, y = x[perm], y[perm]
        out = []
        for b in range(0, len(x), self.batch_size):
            xb, yb = x[b:b + self.batch_size], y[b:b + self.batch_size]
            if self.map_fn is not None:
                xb, yb = self.map_fn(xb, yb)
            out.append((torch.from_numpy(np.ascontiguousarray(xb)),
                        torch.from_numpy(np.ascontiguousarray(yb))))
        return out

    def _partition(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        if pid in self._cache:
            return self._cache[pid]
        data = read_partition(self.manifest, self.paths[pid])
        if self.config.cache != "none":  # disk caching is for loaders that stream; keep it
            self._cache[pid] = data
        return data


@dataclass
class WorkQueue:
    """One epoch's accounting (see the module docstring)."""

    num_items: int
    seed: int
    shuffle: bool = True
    epoch: int = -1
    pending: deque[int] = field(default_factory=deque)
    in_flight: dict[int, int] = field(default_factory=dict)  # worker -> item
    completions: list[tuple[int, int]] = field(default_factory=list)  # (item, worker)
    attempts: dict[int, int] = field(default_factory=dict)  # item -> times handed out
    requeued: list[tuple[int, int]] = field(default_factory=list)  # (item, dead worker)
    resume: dict[int, int] = field(default_factory=dict)  # item -> its first batch to do
    dropped: list[tuple[int, int, int]] = field(default_factory=list)  # (item, worker, batch)

    def open(self, epoch: int) -> None:
        order = (np.random.default_rng([self.seed, epoch, 7]).permutation(self.num_items)
                 if self.shuffle else np.arange(self.num_items))
        self.epoch, self.pending = epoch, deque(int(i) for i in order)
        self.in_flight, self.completions, self.attempts, self.requeued = {}, [], {}, []
        self.resume, self.dropped = {}, []

    def take(self, worker: int) -> int | None:
        assert worker not in self.in_flight, "a worker holds one item at a time"
        if not self.pending:
            return None
        item = self.pending.popleft()
        self.in_flight[worker] = item
        self.attempts[item] = self.attempts.get(item, 0) + 1
        return item

    def complete(self, worker: int, item: int) -> None:
        self._check(worker, item)
        del self.in_flight[worker]
        self.completions.append((item, worker))

    def partial(self, worker: int, item: int, batch: int) -> None:
        """``worker``'s gradients of ``item`` were applied up to ``batch`` (excluded): the
        rest goes to the back of the queue."""
        self._check(worker, item)
        del self.in_flight[worker]
        self.resume[item] = batch
        self.pending.append(item)
        self.dropped.append((item, worker, batch))

    def _check(self, worker: int, item: int) -> None:
        if self.in_flight.get(worker) != item:
            raise ValueError(f"worker {worker} reports item {item} done, but holds "
                             f"{self.in_flight.get(worker)}")

    def release(self, worker: int) -> int | None:
        """A dead worker's item, back to the front of the queue."""
        item = self.in_flight.pop(worker, None)
        if item is not None:
            self.pending.appendleft(item)
            self.requeued.append((item, worker))
        return item

    @property
    def finished(self) -> bool:
        return len(self.completions) == self.num_items

    def accounting(self) -> dict[str, Any]:
        """The epoch's record: who completed what, how often items were handed out."""
        per_worker: dict[int, int] = {}
        for _, w in self.completions:
            per_worker[w] = per_worker.get(w, 0) + 1
        return {"epoch": self.epoch, "items": self.num_items,
                "completions": [list(c) for c in self.completions],
                "attempts": {str(k): v for k, v in sorted(self.attempts.items())},
                "requeued": [list(r) for r in self.requeued],
                "dropped": [list(d) for d in self.dropped],
                "items_by_worker": {str(k): v for k, v in sorted(per_worker.items())}}


STOP, NONE = "stop", "none"


class Coordinator:
    """The queue behind a lock, for the server threads that answer the workers."""

    def __init__(self, queue: WorkQueue, workers: list[int]) -> None:
        self.queue = queue
        self.alive = set(workers)
        self.waiting: set[int] = set()  # workers blocked until there is work again
        self.stopped = False
        self.cond = threading.Condition()
        self.events: list[dict[str, Any]] = []  # membership changes
        self._start = time.monotonic()

    def _event(self, worker: int, what: str, before: set[int]) -> None:
        self.events.append({"time": time.time(),
                            "seconds": round(time.monotonic() - self._start, 3),
                            "epoch": self.queue.epoch, "worker": worker, "event": what,
                            "workers_before": sorted(before),
                            "workers_after": sorted(self.alive)})

    def join(self, worker: int) -> bool:
        """Admit a worker to the running job; False once training is over."""
        with self.cond:
            if self.stopped:
                return False
            before = set(self.alive)
            self.alive.add(worker)
            self._event(worker, "join", before)
            self.cond.notify_all()
            return True

    def leave(self, worker: int, done: int | None, undone: int = -1) -> None:
        """A worker scaled down: its last item reported (as ``take``), then no more."""
        with self.cond:
            if worker not in self.alive:
                return
            self._report(worker, done, undone)
            self._drop(worker, "leave")

    def take(self, worker: int, done: int | None, *, wait: bool, undone: int = -1
             ) -> tuple[str, int, int]:
        """("item", epoch, item), (NONE, ...) when ``wait`` is False and nothing is pending,
        or (STOP, ...) at the end of training (or for a worker declared dead). ``done``:
        the item the worker finished, its batches applied up to ``undone`` (-1: all)."""
        with self.cond:
            if worker not in self.alive:
                return STOP, -1, -1
            self._report(worker, done, undone)
            if wait:
                self.waiting.add(worker)
                self.cond.notify_all()
                self.cond.wait_for(lambda: self.stopped or worker not in self.alive
                                   or bool(self.queue.pending))
                self.waiting.discard(worker)
            if self.stopped or worker not in self.alive:
                return STOP, -1, -1
            item = self.queue.take(worker)
            return ("item", self.queue.epoch, item) if item is not None else (NONE, -1, -1)

    def lost(self, worker: int) -> int | None:
        with self.cond:
            if worker not in self.alive:
                return None
            item = self.queue.release(worker)
            self._drop(worker, "lost")
            return item

    def _report(self, worker: int, done: int | None, undone: int) -> None:
        """The item ``worker`` finished, its batches applied up to ``undone`` (-1: all); or,
        none reported, the one the servers stopped midway, back to the queue."""
        if done is not None and undone >= 0:
            self.queue.partial(worker, done, undone)
        elif done is not None:
            self.queue.complete(worker, done)
        elif worker in self.queue.in_flight:
            self.queue.release(worker)
        self.cond.notify_all()

    def _drop(self, worker: int, what: str) -> None:
        """``worker`` counts no more (it left, or was lost): a membership event."""
        before = set(self.alive)
        self.alive.discard(worker)
        self.waiting.discard(worker)
        self._event(worker, what, before)
        self.cond.notify_all()

    def open_epoch(self, epoch: int) -> None:
        with self.cond:
            self.queue.open(epoch)
            self.cond.notify_all()

    def wait_epoch_over(self, timeout: float) -> bool:
        """True when every item is complete and every live worker is waiting (so none has a
        gradient in flight). Raises when no worker is left."""
        with self.cond:
            self.cond.wait_for(self._over, timeout)
            if not self.alive:
                raise RuntimeError("every worker has died; nothing is left to train")
            return self._over()

    def _over(self) -> bool:
        return not self.alive or (self.queue.finished and self.waiting == self.alive)

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
