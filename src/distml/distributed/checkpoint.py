"""Sharded, atomic, rotating checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint is a folder ``step-NNNNNNNN/``: DCP's shards and ``.metadata`` (model,
optimizer, best weights; each rank writes its own shards, and DCP reshards on load, so a
run can resume on another world size where the strategy allows), ``rank-R.pt`` per rank
(RNG, progress, LR schedule, loaded with ``weights_only=True``), and ``extra.pt`` for state a
strategy saves whole. It is written under a temporary name and renamed by rank 0 when every
rank has finished, so a folder named ``step-*`` is complete. A checkpoint that fails to load
is reported and the previous one is tried; the ranks agree on the outcome.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distml.distributed.runtime import DistEnv

logger = logging.getLogger(__name__)

# DCP works without a process group too; its warning about that is noise here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable",
                        category=UserWarning)

_PREFIX = "step-"


def checkpoint_paths(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{_PREFIX}*") if (p / ".metadata").is_file())


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def save_checkpoint(
    directory: Path, step: int, *, sharded: dict[str, Any], rank_state: dict[str, Any],
    extra: dict[str, Any] | None, env: DistEnv, keep: int,
) -> Path:
    final = directory / f"{_PREFIX}{step:08d}"
    tmp = directory / f".{final.name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(env)
    dcp.save(sharded, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank-{env.rank}.pt")
    if extra is not None:
        torch.save(extra, tmp / "extra.pt")
    _barrier(env)
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_paths(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(env)
    return final


def read_rank_state(path: Path, env: DistEnv) -> dict[str, Any]:
    """This rank's state; after a change of world size, rank 0's stands in for new ranks."""
    own = path / f"rank-{env.rank}.pt"
    return torch.load(own if own.is_file() else path / "rank-0.pt", weights_only=True)


def load_sharded(path: Path, template: dict[str, Any]) -> dict[str, Any]:
    """Fill ``template`` (the state to restore, as this rank holds it) from the checkpoint."""
    dcp.load(template, checkpoint_id=str(path))
    extra = path / "extra.pt"
    template["extra"] = torch.load(extra, weights_only=True) if extra.is_file() else None
    return template


def agree(ok: bool, env: DistEnv) -> bool:
    """True only when every rank says True."""
    if not env.distributed:
        return ok
    flag = torch.tensor([int(ok)], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
