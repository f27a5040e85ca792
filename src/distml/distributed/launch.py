"""Launchers: start ``world_size`` training processes running ``python -m distml.train``.

The local launcher is torchrun's own elastic agent used as a library: it rendezvouses on a
free local port, prefixes each process's output with its rank, restarts every process up to
``train.max_restarts`` times when one dies (they resume from the last checkpoint), and on an
error or Ctrl-C tears every process down. Nothing here is a cluster engine of our own.

On one machine, the same as ``distml train`` with the local launcher::

    torchrun --standalone --nproc-per-node 2 -m distml.train examples/digits.yaml \\
        --set train.parallel.strategy=ddp --set train.parallel.world_size=2

On several machines (run on every node; HOST is node 0, reachable from the others, and the
output folder is on a file system every node shares)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id my-job --max-restarts 3 -m distml.train examples/digits.yaml \\
        --set train.parallel.strategy=fsdp --set train.parallel.world_size=8 \\
        --set train.parallel.num_nodes=2
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from distml.errors import DistmlError


def launch_local(
    module: str, args: list[str], *, world_size: int, max_restarts: int, log_dir: Path,
    what: str,
) -> None:
    """Run ``python -m module *args`` on ``world_size`` local processes; ``what`` names the
    job in errors."""
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=world_size, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
        monitor_interval=0.1, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), tee=Std.ALL),
        log_line_prefix_template="[rank ${local_rank}] ",
    )
    try:
        elastic_launch(config, sys.executable)("-m", module, *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        message = failure.message
        if isinstance(message, dict):  # an error file written by the failed process
            message = message.get("message", "")
        if not failure.error_file_data:
            message = "see its log above"
        raise DistmlError(
            f"{what} failed on rank {rank} (exit code {failure.exitcode}"
            f"{f', after {max_restarts} restarts' if max_restarts else ''}): "
            f"{str(message).strip()}"
        ) from None
    except SignalException as e:
        raise KeyboardInterrupt from e


def launch_training(run_dir: Path, candidate: str, *, world_size: int, max_restarts: int,
                    resume: bool) -> None:
    """Train one candidate of the run in ``run_dir`` with ``python -m distml.train``."""
    args = ["--run-dir", str(run_dir), "--candidate", candidate, *(["--resume"] * resume)]
    launch_local("distml.train", args, world_size=world_size, max_restarts=max_restarts,
                 log_dir=run_dir / "logs" / candidate, what=f"training {candidate!r}")
