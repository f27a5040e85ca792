"""What a strategy's wrapper adds to a step on this machine beyond the compute and the
message bytes the step-time model prices: Python hooks, copies in and out of flat buffers,
DTensor dispatch, the pipeline schedule's bookkeeping, the latency of each collective as
the wrapper really issues them, the loss's all-reduce.

Measured, not assumed: each strategy verify runs at world size 2 (ddp, zero1, fsdp and its
ZeRO-2 variant, tensor, the pipeline schedules, ps-sync) trains a probe MLP for a few steps
on a 2-rank gloo group, at two sizes, as distml runs it (``make_strategy``); the plain
probe runs on both ranks at once beside it (so its compute rate is the one ranks sharing
the cores get). What the step-time model prices for that probe is taken off, and the rest
split into a cost per step and a cost per unit of the thing the wrapper works per
(``steptime.units``): FSDP units, tensor-parallel modules, parameter tensors (ddp's and
zero1's hooks, the servers' messages), micro-batches x stages per rank (the pipeline's
actions). The probe is none of the planned models: nothing is fitted to the plans it
prices.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from distml.config import TrainSettings
from distml.plan.calibrate import Machine, spawn
from distml.plan.steptime import axis_overheads, units

PROBE_WORLD = 2
PROBE_BATCH = 32  # rows of the probe's global batch
PROBE_WIDTH = 64
PROBE_SIZES = ((4, 2), (8, 4))  # (Linear layers, pipeline micro-batches) of the two probes
ROUNDS, STEPS_PER_ROUND = 6, 3  # the first round warms up: 15 steps timed per run


def probe_model(layers: int) -> torch.nn.Module:
    from distml.models.mlp import MLP

    torch.manual_seed(0)
    return MLP(in_features=32, num_outputs=8, hidden_sizes=[PROBE_WIDTH] * (layers - 1))


def probe_settings(parallel: dict[str, Any], microbatches: int) -> TrainSettings:
    """The default training settings (AdamW, clipping at 1) under ``parallel``."""
    from distml.config import deep_merge
    from distml.plan.predict import settings_of

    base = TrainSettings(batch_size=PROBE_BATCH)
    if parallel.get("pipeline") is not None or "pipeline" in parallel["strategy"]:
        parallel = deep_merge(parallel, {"pipeline": {"num_microbatches": microbatches}})
    return settings_of(base, parallel, False)


def probe_plans() -> dict[str, dict[str, Any]]:
    """verify's variants at the probe's world size, each on one axis (name -> parallel)."""
    from distml.config.strategies import VARIANTS
    from distml.plan.predict import candidates_of

    found = {}
    for name, parallel in candidates_of(TrainSettings(), PROBE_WORLD):
        if parallel["world_size"] != PROBE_WORLD or name not in VARIANTS or \
                parallel.get("data_degree", PROBE_WORLD) not in (1, PROBE_WORLD):
            continue
        servers = parallel.get("parameter_server", {}).get("num_servers")
        if servers is None or servers == PROBE_WORLD - 1:
            found.setdefault(name, parallel)
    return found


def _probe_worker(rank: int, port: int, out: str) -> None:
    """Both ranks: the plain probe (each on its own rows) and every strategy's, in rounds
    (a few steps of each in turn, the first round a warm-up), so that a burst of load on
    the machine falls on all of them alike; per run, the median step."""
    import torch.distributed as dist

    from distml.distributed.runtime import DistEnv

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // PROBE_WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=PROBE_WORLD)
    env = DistEnv(rank, rank, PROBE_WORLD)
    result: dict[str, dict[str, float]] = {}
    try:
        for layers, micro in PROBE_SIZES:
            steps = {name: _probe_step(parallel, layers, micro, env)
                     for name, parallel in {"plain": None, **probe_plans()}.items()}
            times: dict[str, list[float]] = {name: [] for name in steps}
            for round_ in range(ROUNDS):
                for name, step in steps.items():
                    dist.barrier()
                    for _ in range(STEPS_PER_ROUND):
                        start = time.perf_counter()
                        step()
                        if round_:
                            times[name].append(time.perf_counter() - start)
            for name, ts in times.items():
                result.setdefault(name, {})[str(layers)] = statistics.median(ts)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _probe_step(parallel: dict[str, Any] | None, layers: int, micro: int, env: Any
                ) -> Callable[[], float]:
    """One training step of the probe under ``parallel`` (None: plain, one process)."""
    from distml.distributed.runtime import DistEnv
    from distml.distributed.strategy import Strategy, make_strategy

    s = probe_settings(parallel or {"strategy": "single", "world_size": 1}, micro)
    rows = PROBE_BATCH // (s.dims.data if parallel else PROBE_WORLD)
    x, y = torch.randn(rows, 32), torch.randint(0, 8, (rows,))
    model = probe_model(layers)
    strategy = Strategy(model, s, DistEnv()) if parallel is None else \
        make_strategy(s.parallel.strategy, model, s, env, sample=x[:2])
    return lambda: strategy.train_step([(x, y)], torch.nn.functional.cross_entropy)


def measure_probes(port: int, scratch: str) -> dict[str, dict[str, float]]:
    """Seconds per step of the plain probe and of each strategy's, by probe size."""
    spawn(_probe_worker, PROBE_WORLD, port, scratch)
    with open(scratch) as f:
        return json.load(f)


def fit(measured: dict[str, dict[str, float]], m: Machine
        ) -> tuple[tuple[str, float, float], ...]:
    """(variant, seconds per step, seconds per unit) of each probed strategy: what its
    runs took beyond the model's price of them, as a line through the two probe sizes;
    neither part below zero."""
    points: dict[str, list[tuple[int, float]]] = {}
    for name, layers, key, n, price in priced(measured["plain"], m):
        if name in measured:
            points.setdefault(key, []).append((n, measured[name][str(layers)] - price))
    return tuple((key, *_line(pts)) for key, pts in points.items())


def priced(plain: dict[str, float], m: Machine) -> list[tuple[str, int, str, int, float]]:
    """(variant, probe layers, the overhead it measures, its units, the step-time model's
    price of that run without overheads) of each probe run; the price's op_seconds from the
    plain probe's runs (``plain``: layers -> seconds), on both ranks at the same time."""
    from distml.plan.predict import Plan, predict

    out = []
    for layers, micro in PROBE_SIZES:
        trace_at = _tracer(layers)
        work = trace_at(PROBE_BATCH // PROBE_WORLD).step + \
            trace_at(PROBE_BATCH // PROBE_WORLD).optimizer_step
        rest = plain[str(layers)] - work.flops / m.flops_per_s - \
            work.bytes / m.memory_bytes_per_s
        probe_m = replace(m, op_seconds=max(rest / max(work.ops, 1), m.op_seconds),
                          overheads=())
        for name, parallel in probe_plans().items():
            s = probe_settings(parallel, micro)
            d = s.dims
            plan = predict(Plan("probe", name, s.parallel.strategy, d.world_size, {}, False,
                                parallel), s, trace_at, lambda _w, pm=probe_m: (pm, 1.0))
            (key, kind), = axis_overheads(s, d)
            micro_steps = s.parallel.pipeline.num_microbatches if d.pipeline > 1 else 1
            n = units(kind, trace_at(PROBE_BATCH // (d.data * micro_steps)), s, micro_steps)
            out.append((name, layers, key, n, plan.step_seconds))
    return out


def _tracer(layers: int) -> Callable[[int], Any]:
    """The probe's step traced at a micro-batch size (cached per size)."""
    from distml.plan.trace import trace_step

    model = probe_model(layers)
    sample = (torch.randn(2, 32), torch.randint(0, 8, (2,)))
    step = {"loss": torch.nn.functional.cross_entropy, "grad_clip": 1.0,
            "make_optimizer": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}
    return functools.cache(lambda batch: trace_step(model, sample, batch=batch, **step))


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the line through the (units, seconds) points (averaged per
    unit count: two probes of one configuration), both kept >= 0; one unit count: all of
    it per step."""
    by_n: dict[int, list[float]] = {}
    for n, r in points:
        by_n.setdefault(n, []).append(r)
    means = sorted((n, sum(rs) / len(rs)) for n, rs in by_n.items())
    (n1, r1), (n2, r2) = means[0], means[-1]
    if n1 == n2:
        return max(r1, 0.0), 0.0
    slope = max((r2 - r1) / (n2 - n1), 0.0)
    return max((r1 + r2) / 2 - slope * (n1 + n2) / 2, 0.0), slope
