"""What a parameter-server run reports: per-epoch statistics (with the per-worker straggler
view) for the callbacks, and the summary kept in ``result.json``.

With all-reduce a slow rank is invisible per rank (everyone waits equally); here each
worker's items, batches, compute, injected sleep and waiting are its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distml.config import ParameterServerConfig
from distml.training.telemetry.system import SystemSampler


def worker_view(stats: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per worker rank: items and batches processed, seconds computing, sleeping (an
    injected straggler), waiting (for servers and work), mean seconds per batch and the
    share of its time spent waiting."""
    out = {}
    for rank, s in sorted(stats.items()):
        busy = s["compute_s"] + s["straggle_s"] + s["wait_s"]
        out[str(rank)] = {
            "items": s["items"], "batches": s["batches"], "compute_s": s["compute_s"],
            "straggle_s": s["straggle_s"], "wait_s": s["wait_s"],
            "step_s": busy / max(s["batches"], 1), "wait_share": s["wait_s"] / max(busy, 1e-9),
            "peak_mem_bytes": s["peak_mem_bytes"],
        }
    return out


def staleness_summary(updates: list[Any]) -> dict[str, float]:
    values = np.array([u[3] for u in updates] or [0])
    return {"mean": float(values.mean()), "max": int(values.max()),
            "p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def epoch_stats(epoch: int, samples: int, seconds: float, stats: dict[int, dict[str, float]],
                updates: list[Any], *, system: SystemSampler | None) -> dict[str, Any]:
    from distml.training.trainer import peak_memory

    out: dict[str, Any] = {
        "epoch": epoch, "samples_per_s": samples / max(seconds, 1e-9),
        "data_stall": 0.0,  # workers read their items themselves; their waiting is below
        "peak_mem_bytes": peak_memory(), "workers": worker_view(stats),
        "staleness": staleness_summary(updates)}
    if system is not None:
        out["system"] = [system.summary()]  # server 0's
    return out


def ps_summary(ps: ParameterServerConfig, *, servers: list[int], workers: list[int],
               updates: list[Any], dropped: int, worker_stats: dict[int, dict[str, float]],
               accounting: list[dict[str, Any]], alive: list[int],
               membership: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The run's record: mode, staleness of every applied gradient, ssp's leads, dropped
    (late) gradients, the straggler view, the work queue's accounting per epoch, the
    workers that died, and those that joined or left mid-run (``membership``)."""
    joined = [e["worker"] for e in membership if e["event"] == "join"]
    left = {e["worker"] for e in membership if e["event"] == "leave"}
    workers = [*workers, *joined]
    cols = list(zip(*updates, strict=True)) if updates else [(), (), (), ()]
    histogram: dict[str, int] = {}
    for v in cols[3]:
        histogram[str(v)] = histogram.get(str(v), 0) + 1
    return {
        "mode": ps.mode, "servers": servers, "workers": workers,
        "staleness_bound": ps.staleness if ps.mode == "ssp" else None,
        "backup_workers": ps.backup_workers if ps.mode == "sync" else None,
        "staleness": {**staleness_summary(updates), "histogram": histogram},
        "max_lead": max(cols[2], default=0),
        "dropped_gradients": dropped,
        "per_worker": worker_view(worker_stats),
        "accounting": accounting,
        "dead_workers": [w for w in workers if w not in alive and w not in left],
        "joined_workers": joined,
        "membership": list(membership),
        "updates": {"worker": list(cols[0]), "clock": list(cols[1]), "lead": list(cols[2]),
                    "staleness": list(cols[3])},
    }
