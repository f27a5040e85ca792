"""One process's place in a distributed job, read from the environment torchrun sets.

RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT come from
torchrun or distml's local launcher (which is torchrun's elastic agent). The device and the
collective backend come from ``distml.device``: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from distml import processes
from distml.device import collective_backend, default_device
from distml.errors import DistmlError

_job_store: dist.Store | None = None  # the rendezvous store this process joined with


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group when launched; pick this rank's device and CPU threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # ranks on one machine share its cores; more threads than cores only contend
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        threads = os.environ.get("OMP_NUM_THREADS") or (os.cpu_count() or 1) // local_world
        torch.set_num_threads(max(1, int(threads)))
    if "MASTER_ADDR" in os.environ and not dist.is_initialized():  # launched: torchrun/ours
        global _job_store
        _job_store = _store(world)
        dist.init_process_group(
            backend=collective_backend(device), store=_job_store, rank=rank,
            world_size=world, device_id=device if device.type == "cuda" else None,
        )
    return DistEnv(rank, local_rank, world, device)


def job_store() -> dist.Store | None:
    """The key-value store of this job (this restart attempt's keys), for coordination that
    must not be a collective: parameter servers' worker leases."""
    return _job_store


def _store(world: int) -> dist.Store:
    """The rendezvous store, with a prefix per restart attempt where it outlives one.

    Under torchrun's agent (and so our launcher) every attempt talks to the agent's one
    store by default; without a prefix, restarted processes would read the addresses that
    the dead attempt published and wait on them forever. With the store unshared
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as distml's multi-node launcher sets), rank 0
    serves a new one each attempt, and the restart counts of the ranks may differ (a
    restarted node's new agent counts from 0), so there is no prefix to agree on.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_store and int(os.environ.get("RANK", "0")) == 0,
        timeout=timedelta(minutes=10), wait_for_workers=False,
    )
    if not agent_store:
        return store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"distml/attempt-{attempt}", store)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value: object, env: DistEnv) -> object:
    """Rank 0's ``value``, on every rank."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if env.distributed:
        dist.barrier()


def gather_objects(value: object, env: DistEnv) -> list:
    """``value`` from every rank, in rank order (on every rank)."""
    if not env.distributed:
        return [value]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_mean(value: float, env: DistEnv) -> float:
    """The mean of a scalar over ranks (the loss each rank saw)."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def worker_main(body: Callable[[DistEnv], None]) -> None:
    """The life of one launched process: logging, joining the process group, ``body``, and
    leaving it. A user error (DistmlError) is logged and recorded for the launcher, which
    names the rank in its report, and exits with code 2."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run() -> None:
        processes.setup_logging()
        env = init_distributed()
        try:
            body(env)
        except DistmlError as e:
            processes.exit_on_user_error(e)
        finally:
            shutdown()

    run()


def run_worker(fn: Callable[[], None]) -> NoReturn:
    """Run a worker's main, then leave without the interpreter's finalizers.

    After the process group is destroyed, tearing down the interpreter can still destroy a
    running C++ thread of the collectives library (seen as 'terminate called without an
    active exception' about once in a dozen fsdp runs), turning a finished job into a
    crash. Output is flushed and the process exits with the main's code instead.
    """
    code = 0
    try:
        fn()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported here, then the exit code says it
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
