"""An elastic job's bookkeeping in the training loop (``train.parallel.min_nodes``/``max_nodes``).

When a node leaves or joins, torchrun's agents stop every rank and start them again at the
next rendezvous, at the new world size; the ranks resume from the newest checkpoint, and the
loader deals the rest of the epoch among them (``distml.data.elastic``). Here:

- a SIGTERM (an agent stopping its ranks because a node is waiting to join, or a shutdown)
  is noted; after the step in progress, every rank learns of it (one tiny all-reduce per
  step), the job checkpoints and the ranks exit, so a join loses no step;
- rank 0 notes each finished step (``checkpoints/last-step.json``), so that the resumed job
  knows the steps lost with a dead node (those after the newest checkpoint);
- each rank counts the rows it trained on (the loader's ``seen``); at every checkpoint and
  epoch end the counts are summed over the ranks, so a restart carries them and each epoch
  ends with the proof that every row was used exactly once (``epoch_samples``);
- each restart is recorded (time, old and new world size, the step resumed from, steps lost,
  seconds from the last step before it to the first after) in ``membership_changes``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distml.data.loader import PartitionLoader
from distml.distributed.runtime import DistEnv

logger = logging.getLogger(__name__)

LAST_STEP = "last-step.json"


class ElasticBook:
    def __init__(self, loader: PartitionLoader, env: DistEnv, checkpoint_dir: Path) -> None:
        self.loader, self.env, self.dir = loader, env, checkpoint_dir
        self.base = np.zeros_like(loader.seen)  # counts restored from a checkpoint (rank 0)
        self.pending: dict[str, Any] | None = None  # a restart waiting for its first step
        self.signalled = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        logger.info("SIGTERM: checkpointing after this step, then leaving")
        self.signalled = True

    def stop_requested(self) -> bool:
        """Whether any rank was told to stop (a collective: every rank calls it each step)."""
        if not self.env.distributed:
            return self.signalled
        flag = torch.tensor([int(self.signalled)], device=self.env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def step_done(self, state: Any) -> None:
        """Rank 0 notes the step; a restart's first step completes its record."""
        if self.pending is not None:
            change, self.pending = self.pending, None
            change["first_step_time"] = time.time()
            if change.get("last_step_time") is not None:
                change["recovery_seconds"] = change["first_step_time"] - change["last_step_time"]
            state.membership_changes.append(change)
        if self.env.is_main:
            tmp = self.dir / f".{LAST_STEP}.tmp"
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"step": state.step, "time": time.time(),
                                       "world_size": self.env.world_size}))
            os.replace(tmp, self.dir / LAST_STEP)

    def _totals(self) -> np.ndarray:
        """Every row's uses so far this epoch, over all ranks; clears this rank's count."""
        counts = torch.from_numpy(self.loader.seen + self.base).to(self.env.device)
        if self.env.distributed:
            dist.all_reduce(counts)
        self.loader.seen[:] = 0
        return counts.cpu().numpy()

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The epoch's counts so far, for every rank's checkpoint (a collective)."""
        total = self._totals()
        self.base = total if self.env.is_main else np.zeros_like(total)
        return {"counts": torch.from_numpy(total.copy())}

    def end_epoch(self, state: Any) -> None:
        """Record how often the epoch used each row (a collective)."""
        total = self._totals()
        self.base = np.zeros_like(total)
        state.epoch_samples.append({"epoch": state.epoch, "rows": int(total.size),
                                    "min_uses": int(total.min()), "max_uses": int(total.max()),
                                    "unused": int((total == 0).sum()),
                                    "repeated": int((total > 1).sum())})

    def restored(self, saved: dict[str, torch.Tensor] | None, state: Any) -> None:
        """After a resume: take the counts (rank 0) and open the restart's record."""
        if saved is not None and self.env.is_main:
            self.base = saved["counts"].numpy().astype(self.loader.seen.dtype)
        last = self._last_step()
        self.pending = {
            "time": time.time(),
            "old_world_size": last["world_size"] if last else (state.world_size or None),
            "new_world_size": self.env.world_size, "resumed_step": state.step,
            "steps_lost": max(0, last["step"] - state.step) if last else 0,
            "last_step_time": last["time"] if last else None,
        }
        state.world_size = self.env.world_size
        logger.info("elastic: resumed at step %d on %d ranks (was %s; %d steps lost)",
                    state.step, self.env.world_size, self.pending["old_world_size"],
                    self.pending["steps_lost"])

    def _last_step(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.dir / LAST_STEP).read_text())
        except (OSError, ValueError):
            return None
