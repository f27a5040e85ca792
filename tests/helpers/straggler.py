"""A persistent straggler, supplied to distml through its seams (no switch in product code):
a parameter-server worker (``parallel.parameter_server.worker``) of which one rank sleeps a
multiple of its compute time after each batch. Sleeping uses no CPU, so it slows that
worker only, even on a shared 2-core machine."""

from __future__ import annotations

import time

from distml.distributed.param_server.worker import Worker


def median_compute(recent: list[float], seconds: float, *, window: int = 9) -> float:
    """The compute time a straggler's sleep is a multiple of: the median of its last
    ``window`` steps (``recent`` is updated), so one cold first step does not set it."""
    recent.append(seconds)
    del recent[:-window]
    return sorted(recent)[len(recent) // 2]


class Straggler(Worker):
    """Worker rank ``slow_rank`` sleeps ``factor`` times its compute time after each batch,
    and at least ``min_sleep_s``: on a loaded machine a round trip to the server can outlast
    ten times a tiny model's compute, and then a relative sleep alone slows nobody down."""

    slow_rank, factor, min_sleep_s = 2, 10.0, 0.05

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recent: list[float] = []

    def after_gradient(self, compute: float) -> float:
        if self.rank != self.slow_rank:
            return 0.0
        sleep = max(self.factor * median_compute(self.recent, compute), self.min_sleep_s)
        time.sleep(sleep)
        return sleep


class Raiser(Worker):
    """Worker rank ``bad_rank`` raises after ``after`` batches, as a worker with a bug or a
    bad batch would: the job must fail with that error, not go on without the worker."""

    bad_rank, after = 2, 3

    def after_gradient(self, compute: float) -> float:
        if self.rank == self.bad_rank and self.stats["batches"] >= self.after:
            raise ValueError(f"worker rank {self.rank}: a bad batch (injected)")
        return 0.0
