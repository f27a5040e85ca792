"""The machine the planner prices a step on: compute rate, memory bandwidth, the cost of one
operator call, and the network's bandwidth and latency between ranks. Measured here in a
few seconds (matrix products, a large copy, tiny operators, and a two-process gloo
all-reduce on loopback), or given for a target machine (an H100's numbers, say); see
``distml.plan.planner.Target``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distml.fsutil import write_json_atomic
from distml.storage import cache_root

logger = logging.getLogger(__name__)

CALIBRATION_VERSION = 3  # bump when what is measured changes: older caches are ignored


@dataclass(frozen=True)
class Machine:
    """Rates of one rank with ``threads`` threads (cores are shared by the ranks of a node)."""

    flops_per_s: float  # dense matrix products
    memory_bytes_per_s: float  # what elementwise operators stream
    op_seconds: float  # the fixed cost of one operator call (dispatch, launch)
    network_bytes_per_s: float  # one link, as a ring collective sees it
    network_latency_s: float  # one message
    cores: int  # per node: ranks beyond it share them
    threads: int = 1  # threads of the rank these rates were measured with
    source: str = "measured"
    # measured wrapper overheads: (verify's variant, seconds per step, per unit); see
    # distml.plan.overhead
    overheads: tuple[tuple[str, float, float], ...] = ()
    # measured: (collective, its time over what the ring model gives it from the all-reduce's
    # bandwidth); gloo's reduce-scatter is an all-reduce underneath, so it costs about 2x
    collective_factors: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def factor(self, collective: str) -> float:
        return dict(self.collective_factors).get(collective, 1.0)


def _best(fn, repeats: int = 5) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_compute(threads: int) -> tuple[float, float, float]:
    """FLOP/s of a matrix product, bytes/s of a large add, seconds per tiny operator, on
    ``threads`` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        flops = 10 * 2 * 512**3 / _best(lambda: [a @ b for _ in range(10)])
        big = torch.randn(4_000_000)
        out = torch.empty_like(big)
        mem = 10 * 3 * big.nbytes / _best(lambda: [torch.add(big, 1.0, out=out)
                                                     for _ in range(10)])
        tiny = torch.randn(8)
        op = _best(lambda: [tiny.add(1.0) for _ in range(2000)]) / 2000
    finally:
        torch.set_num_threads(before)
    return flops, mem, op


def _allreduce_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        big, small = torch.zeros(2_000_000), torch.zeros(1)
        half, whole = torch.zeros(1_000_000), torch.zeros(2_000_000)
        t_big = _best(lambda: dist.all_reduce(big), 7)
        t_small = _best(lambda: [dist.all_reduce(small) for _ in range(50)], 3) / 50
        t_scatter = _best(lambda: dist.reduce_scatter_tensor(half, big), 7)
        t_gather = _best(lambda: dist.all_gather_into_tensor(whole, half), 7)
        if rank == 0:
            # a ring all-reduce of n bytes on 2 ranks moves n bytes each way in 2 messages;
            # a reduce-scatter or an all-gather, n / 2 in one
            bw, latency = big.nbytes / max(t_big - t_small, 1e-9), t_small / 2
            ring = big.nbytes / 2 / bw + latency
            with open(out, "w") as f:
                f.write(f"{bw} {latency} {t_scatter / ring} {t_gather / ring}")
    finally:
        dist.destroy_process_group()


def measure_network(port: int, scratch: str) -> list[float]:
    """Bandwidth (bytes/s) and latency (s) of gloo's all-reduce between two processes on
    this machine, and the reduce-scatter's and all-gather's factors (``Machine``)."""
    return _spawned(_allreduce_worker, 2, port, scratch)


def spawn(worker, nprocs: int, port: int, scratch: str) -> None:  # noqa: ANN001
    """Run ``worker(rank, port, scratch)`` on ``nprocs`` fresh processes."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(port, scratch), nprocs=nprocs, join=True,
                       start_method="spawn")


def _spawned(worker, nprocs: int, port: int, scratch: str) -> list[float]:  # noqa: ANN001
    """The numbers rank 0 of ``spawn`` wrote to ``scratch``."""
    spawn(worker, nprocs, port, scratch)
    with open(scratch) as f:
        return [float(v) for v in f.read().split()]


def cached(what: str, measure: Callable[[], Any], *, fresh: bool = False) -> Any:
    """``measure()``'s result, kept per machine (host, cores, torch) in distml's cache
    (``$DISTML_CACHE/plan``); ``fresh``: measured again and kept."""
    path = calibration_path(what)
    if not fresh and path.is_file():
        logger.info("plan: %s calibration from %s", what, path)
        return json.loads(path.read_text())
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value)
    return value


def calibration_path(what: str) -> Path:
    key = f"{platform.node()}-{os.cpu_count()}cpu-torch{torch.__version__}"
    return cache_root() / "plan" / f"{what}-v{CALIBRATION_VERSION}-{key}.json"
