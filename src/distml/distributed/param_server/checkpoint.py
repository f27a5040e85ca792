"""Checkpoints of a parameter-server job, taken at the end of an epoch (no gradient in
flight).

``step-NNNNNNNN/server-S/``: each server's shard, optimizer state and version, written by
that server alone through torch.distributed.checkpoint (``no_dist``: no collective, so no
worker, alive or dead, takes part). ``progress.pt``: server 0's training progress, the work
queue's accounting, the staleness records and the best weights. The folder is written under
a temporary name and renamed by server 0 once every server has reported its shard written,
so a folder named ``step-*`` is complete. A job resumes with the number of servers it was
saved with.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from distml.errors import DistmlError

logger = logging.getLogger(__name__)

_PREFIX, _PROGRESS = "step-", "progress.pt"


def staging(directory: Path, step: int) -> Path:
    return directory / f".{_PREFIX}{step:08d}.tmp"


def begin(directory: Path, step: int) -> Path:
    """Server 0: a fresh temporary folder for the checkpoint of ``step``."""
    tmp = staging(directory, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_shard(directory: Path, step: int, server: int, state: dict[str, Any]) -> None:
    dcp.save(state, checkpoint_id=str(staging(directory, step) / f"server-{server}"),
             no_dist=True)


def commit(directory: Path, step: int, progress: dict[str, Any], *, keep: int) -> Path:
    """Server 0, after every server saved its shard: write the progress, rename, rotate."""
    tmp = staging(directory, step)
    torch.save(progress, tmp / _PROGRESS)
    final = directory / f"{_PREFIX}{step:08d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{_PREFIX}*") if (p / _PROGRESS).is_file())


def load_shard(path: Path, server: int, num_servers: int, template: dict[str, Any]
               ) -> dict[str, Any]:
    saved = len(list(path.glob("server-*")))
    if saved != num_servers:
        raise DistmlError(
            f"checkpoint {path} holds {saved} server shard(s), but "
            f"parallel.parameter_server.num_servers={num_servers}; resume with "
            f"num_servers={saved}")
    where = str(path / f"server-{server}")
    dcp.load(template, checkpoint_id=where, no_dist=True)
    return template


def load_rows(path: Path, server: int, prefix: str = "tables/") -> dict[str, torch.Tensor]:
    """A server's sparse-table entries (``prefix``...), whose sizes only the checkpoint knows
    (rows are created when touched): allocated from its metadata, then loaded."""
    where = str(path / f"server-{server}")
    meta = dcp.FileSystemReader(where).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith(prefix)}
    if state:
        dcp.load(state, checkpoint_id=where, no_dist=True)
    return state


def read_progress(path: Path) -> dict[str, Any]:
    return torch.load(path / _PROGRESS, weights_only=True)
