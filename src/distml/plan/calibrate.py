"""The machine the planner prices a step on: compute rate, memory bandwidth, the cost of one
operator call, and the network's bandwidth and latency between ranks. Measured here in a
few seconds (matrix products, a large copy, tiny operators, and a two-process gloo
all-reduce on loopback), or given for a target machine (an H100's numbers, say); see
``distml.plan.planner.Target``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)


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
    tensor_module_s: float = 0.0  # what a tensor-parallel module adds to a fwd+bwd
    fsdp_unit_s: float = 0.0  # what an FSDP unit adds to a fwd+bwd (besides messages)

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


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
        t_big = _best(lambda: dist.all_reduce(big), 3)
        t_small = _best(lambda: [dist.all_reduce(small) for _ in range(50)], 3) / 50
        if rank == 0:
            # a ring all-reduce of n bytes on 2 ranks moves n bytes each way
            bw = big.nbytes / max(t_big - 2 * t_small, 1e-9)
            with open(out, "w") as f:
                f.write(f"{bw} {t_small / 2}")
    finally:
        dist.destroy_process_group()


def measure_network(port: int, scratch: str) -> tuple[float, float]:
    """Bandwidth (bytes/s) and latency (s) of gloo between two processes on this machine."""
    return _spawned(_allreduce_worker, 2, port, scratch)


def _spawned(worker, nprocs: int, port: int, scratch: str) -> tuple[float, float]:  # noqa: ANN001
    """Run ``worker(rank, port, scratch)`` on ``nprocs`` fresh processes; the two numbers
    rank 0 wrote to ``scratch``."""
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(port, scratch), nprocs=nprocs, join=True,
                       start_method="spawn")
    with open(scratch) as f:
        first, second = (float(v) for v in f.read().split())
    return first, second


def _wrapper_worker(rank: int, port: int, out: str) -> None:
    """On a one-rank gloo world: the extra seconds per fwd+bwd of a module under tensor
    parallelism (DTensor dispatch) and of a unit under fully_shard (hooks, copies,
    collectives), over the same plain modules."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(8, 32)

        def model() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])

        def step(m: nn.Module) -> float:
            return _best(lambda: [m(x).sum().backward() for _ in range(10)], 7) / 10

        plain = step(model())
        tp = parallelize_module(model(), mesh, {str(i): ColwiseParallel() if i % 2 == 0
                                                else RowwiseParallel() for i in range(4)})
        sharded = model()
        for unit in sharded:
            fully_shard(unit, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        with open(out, "w") as f:
            f.write(f"{max(step(tp) - plain, 0) / 4} {max(step(sharded) - plain, 0) / 4}")
    finally:
        dist.destroy_process_group()


def measure_wrappers(port: int, scratch: str) -> tuple[float, float]:
    """Seconds a tensor-parallel module and an FSDP unit add to one forward and backward."""
    return _spawned(_wrapper_worker, 1, port, scratch)
