"""Atomic, rotating training checkpoints.

A checkpoint is ``step-NNNNNNNN.pt``: a dict of tensors and plain values saved by torch.save
under a temporary name and renamed when complete. Loading uses ``weights_only=True``, so a
checkpoint can never run code. A corrupt or partial file is reported and the previous
checkpoint is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_PREFIX, _SUFFIX = "step-", ".pt"


def checkpoint_paths(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}"))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_PREFIX}{step:08d}{_SUFFIX}"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in checkpoint_paths(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt ones are skipped with a warning."""
    for path in reversed(checkpoint_paths(directory)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, not fatal
            logger.warning("checkpoint %s is corrupt (%s); trying the previous one", path, e)
    return None
