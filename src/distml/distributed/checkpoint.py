"""Sharded, atomic, rotating checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint is a folder ``step-NNNNNNNN/``: DCP's shards and ``.metadata`` (model,
optimizer, best weights; each rank writes its own shards, and DCP reshards on load, so a
run can resume on another world size where the strategy allows), ``rank-R.pt`` per rank
(RNG, progress, LR schedule, loaded with ``weights_only=True``), and ``extra.pt`` for state a
strategy saves whole. It is written under a temporary name and renamed by rank 0 when every
rank has finished, so a folder named ``step-*`` is complete. A checkpoint that fails to load
is reported and the previous one is tried; the ranks agree on the outcome.

Under a storage URL (a run whose output_dir is ``s3://...``: ``directory`` is its local
mirror), every rank writes its shards straight to the store through DCP's fsspec writer,
``s3://.../checkpoints/step-NNNNNNNN/``, and rank 0 publishes the folder with its marker
once every rank has finished (``distml.storage``): there is no rename on S3, and a folder
without its marker is not a checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# DCP's fsspec storage (not re-exported by torch.distributed.checkpoint in torch 2.13)
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from distml import storage
from distml.distributed.runtime import DistEnv

logger = logging.getLogger(__name__)

# DCP works without a process group too; its warning about that is noise here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable",
                        category=UserWarning)

_PREFIX = "step-"


def checkpoint_paths(directory: Path) -> list[Path | str]:
    """Complete checkpoints, oldest first (URLs, for a directory under a storage URL)."""
    if (url := storage.remote_of(directory)) is not None:
        return list(storage.published(url, f"{_PREFIX}*"))
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
    if (url := storage.remote_of(directory)) is not None:
        return _save_remote(f"{url}/{_PREFIX}{step:08d}", sharded=sharded,
                            rank_state=rank_state, extra=extra, env=env, keep=keep)
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


def _save_remote(target: str, *, sharded: dict[str, Any], rank_state: dict[str, Any],
                 extra: dict[str, Any] | None, env: DistEnv, keep: int) -> str:
    """Each rank writes its part in place; rank 0 publishes when all have, then drops the
    oldest beyond ``keep``."""
    if env.is_main:
        storage.unpublish(target)  # a step saved again (a resumed run) starts clean
    _barrier(env)
    dcp.save(sharded, storage_writer=FsspecWriter(target))
    storage.put_bytes(f"{target}/rank-{env.rank}.pt", _tensor_bytes(rank_state))
    if extra is not None:
        storage.put_bytes(f"{target}/extra.pt", _tensor_bytes(extra))
    _barrier(env)
    if env.is_main:
        storage.mark_published(target)
        directory = target.rsplit("/", 1)[0]
        for old in storage.published(directory, f"{_PREFIX}*")[:-keep]:
            storage.unpublish(old)
    _barrier(env)
    return target


def _tensor_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load_file(path: Path | str, name: str, *, fallback: str | None = None) -> Any:
    """``torch.load`` (weights only) of ``path/name`` (else ``path/fallback``); None if
    neither is there."""
    if isinstance(path, str):
        for n in (name, fallback):
            if n is not None and storage.filesystem(path).exists(f"{path}/{n}"):
                return torch.load(io.BytesIO(storage.get_bytes(f"{path}/{n}")),
                                  weights_only=True)
        return None
    for n in (name, fallback):
        if n is not None and (path / n).is_file():
            return torch.load(path / n, weights_only=True)
    return None


def read_rank_state(path: Path | str, env: DistEnv) -> dict[str, Any]:
    """This rank's state; after a change of world size, rank 0's stands in for new ranks."""
    return _load_file(path, f"rank-{env.rank}.pt", fallback="rank-0.pt")


def load_sharded(path: Path | str, template: dict[str, Any]) -> dict[str, Any]:
    """Fill ``template`` (the state to restore, as this rank holds it) from the checkpoint."""
    if isinstance(path, str):
        dcp.load(template, storage_reader=FsspecReader(path))
    else:
        dcp.load(template, checkpoint_id=str(path))
    template["extra"] = _load_file(path, "extra.pt")
    return template


def agree(ok: bool, env: DistEnv) -> bool:
    """True only when every rank says True."""
    if not env.distributed:
        return ok
    flag = torch.tensor([int(ok)], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
