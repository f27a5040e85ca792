"""``distml plan``'s engine: for each candidate of a config, its model built as training
builds it, traced on the meta device at each micro-batch size a plan needs, priced on the
machine (measured once per thread count a rank would get, or given), and every plan
ranked. ``compare`` sets predictions beside what ``distml verify --separate`` measured.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from distml.config import Config
from distml.data.dataset import Manifest
from distml.distributed.strategy import optimizer_spec
from distml.plan.calibrate import Machine, measure_compute
from distml.plan.overhead import PROBE_WORLD, fit
from distml.plan.predict import Plan, make_plans
from distml.plan.trace import ModelTrace, trace_step
from distml.tasks import loss_fn
from distml.training.candidate import build_candidate_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """Where the plans run: ``machine`` (a given target's, or this one's network) and,
    for this machine, one measurement per thread count; ranks of a node share its cores."""

    network_bytes_per_s: float
    network_latency_s: float
    flops_per_s: float | None = None  # given: a target machine, one device per rank
    memory_bytes_per_s: float | None = None
    op_seconds: float | None = None
    cores: int = 1
    # overhead.measure_probes: (variant, probe layers, seconds per step) of the wrappers'
    # runs on this machine
    probes: tuple[tuple[str, str, float], ...] = ()
    collective_factors: tuple[tuple[str, float], ...] = ()  # measured here (Machine)

    @functools.cache  # noqa: B019 - one measurement per thread count, for this target only
    def machine(self, world: int) -> tuple[Machine, float]:
        """One rank's machine in a world of ``world`` ranks on one node, and the factor
        its compute (and its wrappers' Python) slows by when ranks outnumber cores."""
        if self.flops_per_s is not None:  # a target machine: a device of its own per rank
            return Machine(self.flops_per_s, self.memory_bytes_per_s or 2e12,
                           self.op_seconds if self.op_seconds is not None else 10e-6,
                           self.network_bytes_per_s, self.network_latency_s, world,
                           source="given"), 1.0
        return replace(self._measured(max(1, self.cores // world)),
                       overheads=self.overheads()), max(1.0, world / self.cores)

    @functools.cache  # noqa: B019
    def _measured(self, threads: int) -> Machine:
        """This machine's rates for a rank of ``threads`` threads (measured once a count)."""
        flops, mem, op = measure_compute(threads)
        return Machine(flops, mem, op, self.network_bytes_per_s, self.network_latency_s,
                       self.cores, threads, collective_factors=self.collective_factors)

    @functools.cache  # noqa: B019
    def overheads(self) -> tuple[tuple[str, float, float], ...]:
        """The wrappers' measured overheads, fitted at the probes' world size."""
        if not self.probes:
            return ()
        measured: dict[str, dict[str, float]] = {}
        for name, layers, secs in self.probes:
            measured.setdefault(name, {})[layers] = secs
        return fit(measured, self._measured(max(1, self.cores // PROBE_WORLD)))


def tracer(cfg: Config, name: str, manifest: Manifest, sample: tuple[torch.Tensor, ...]
           ) -> Callable[[int], ModelTrace]:
    """The candidate's step traced at a micro-batch size (cached per size)."""
    cand = cfg.train.candidate(name)
    s = cfg.train.settings_for(cand)
    model, _ = build_candidate_model(cfg, cand, manifest, sample[0][:2])
    cls, kwargs = optimizer_spec(s)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)

    step = {"loss": lambda out, y: loss_fn(manifest.task, out, y),
            "make_optimizer": lambda ps: cls(ps, **kwargs), "grad_clip": s.grad_clip,
            "autocast": autocast}

    @functools.cache
    def at(batch: int) -> ModelTrace:
        return trace_step(model, sample, batch=batch, **step)

    at.model, at.step = model, step  # type: ignore[attr-defined]
    return at


def _real_batch(sample: tuple[torch.Tensor, ...], batch: int) -> list[torch.Tensor]:
    """Rows shaped like the sample's: noise for floats, zeros (a valid id) for integers."""
    return [torch.randn((batch, *t.shape[1:]), dtype=t.dtype) if t.is_floating_point()
            else torch.zeros((batch, *t.shape[1:]), dtype=t.dtype) for t in sample]


def op_seconds(at: Callable[[int], ModelTrace], sample: tuple[torch.Tensor, ...],
               batch: int, m: Machine, *, steps: int = 20) -> float:
    """Seconds per operator that make the traced step's price match the median of a few
    real steps of the model in this process: what Python, autograd and the optimizer add
    around each operator (far more than a bare operator call costs). The measured bare call
    when the model is too large to run here."""
    trace = at(batch)
    if trace.param_bytes > 2**29:
        return m.op_seconds
    model = copy.deepcopy(at.model)  # type: ignore[attr-defined]
    step = at.step  # type: ignore[attr-defined]
    opt = step["make_optimizer"](list(model.parameters()))
    x, y = _real_batch(sample, batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(m.threads)  # as a rank that shares the cores runs
    try:
        times = _timed_steps(model, opt, step, x, y, steps)
    finally:
        torch.set_num_threads(threads)
    work = trace.step + trace.optimizer_step
    rest = statistics.median(times[2:]) - work.flops / m.flops_per_s - \
        work.bytes / m.memory_bytes_per_s
    return max(rest / max(work.ops, 1), m.op_seconds)


def _timed_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, step: dict[str, Any],
                 x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with contextlib.nullcontext() if step["autocast"] is None else torch.autocast(
                "cpu", dtype=step["autocast"]):
            loss = step["loss"](model(x), y)
        loss.backward()
        if step["grad_clip"] is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), step["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def plan_candidates(cfg: Config, manifest: Manifest, sample: tuple[torch.Tensor, ...], *,
                    world_size: int, memory_bytes: int | None, target: Target,
                    only: str | None = None) -> dict[str, Any]:
    """Every candidate's plans (ranked) and the layouts that do not apply, with why."""
    out: dict[str, Any] = {"world_size": world_size, "memory_bytes": memory_bytes,
                           "candidates": {}}
    for cand in cfg.train.candidates:
        if only is not None and cand.name != only:
            continue
        at = tracer(cfg, cand.name, manifest, sample)
        s = cfg.train.settings_for(cand)
        per_op = None
        if target.flops_per_s is None:  # this machine: price operators as the model runs
            per_op = op_seconds(at, sample, s.batch_size // s.grad_accum_steps,
                                target.machine(target.cores)[0])

        def machine_for(world: int, per_op: float | None = per_op) -> tuple[Machine, float]:
            m, slowdown = target.machine(world)
            return (m if per_op is None else replace(m, op_seconds=per_op)), slowdown

        plans, invalid = make_plans(cand, s, at.model, world_size=world_size, trace_at=at,
                                    machine_for=machine_for, memory_bytes=memory_bytes)
        out["candidates"][cand.name] = {"plans": plans, "invalid": invalid,
                                        "op_seconds": per_op, **_sizes(at(1))}
    return out


def _sizes(trace: ModelTrace) -> dict[str, int]:
    """Parameter count, and the largest module's own (DeepSpeed's estimators take both)."""
    per_module: dict[str, int] = {}
    for name, shape, _ in trace.params:
        module = name.rpartition(".")[0]
        per_module[module] = per_module.get(module, 0) + math.prod(shape)
    return {"params": sum(per_module.values()), "largest": max(per_module.values(), default=0)}


def measured_state(result: dict[str, Any]) -> list[int]:
    """Per rank, the most it held of params + grads + optimizer at verify's three moments
    (what bench/train.py reports); ranks whose step verify cannot probe (parameter
    servers) are left out."""
    return [max(sum(b.values()) for b in moments.values())
            for moments in result["held_bytes_per_rank"] if moments]


def compare(plan: Plan, result: dict[str, Any], *, cuda: bool = False) -> dict[str, Any]:
    """Predicted against measured: per-rank memory (model state on CPU; everything on
    CUDA) and step time; errors relative to the measurement."""
    timing = timing_row(plan, result)
    if plan.degrees.get("servers") and not cuda:
        return timing  # verify probes a worker after forward only: no full picture
    if cuda:
        # verify reports the largest rank's allocator peak
        predicted = [max(m["total"] for m in plan.memory_per_rank)]
        measured = [result["peak_mem_bytes"]]
    else:
        predicted = [m["total"] - m["activations"] for m in plan.memory_per_rank]
        measured = measured_state(result)
    predicted, measured = sorted(predicted), sorted(measured)
    if len(predicted) != len(measured):
        predicted = [max(predicted)] * len(measured)
    mem_err = [abs(p - m) / max(m, 1) for p, m in zip(predicted, measured, strict=True)]
    return {**timing, "predicted_bytes_per_rank": predicted,
            "measured_bytes_per_rank": measured, "memory_error": sum(mem_err) / len(mem_err)}


def timing_row(plan: Plan, result: dict[str, Any]) -> dict[str, Any]:
    """Predicted against measured step time: the median of the timed steps, their
    quartiles (the spread), the error relative to the median."""
    measured = measured_step(result)
    return {"plan": plan.label, "strategy": plan.name, "predicted_step_s": plan.step_seconds,
            "measured_step_s": measured,
            "measured_step_quartiles_s": result.get("step_seconds_quartiles"),
            "step_time_error": abs(plan.step_seconds - measured) / max(measured, 1e-12)}


def measured_step(result: dict[str, Any]) -> float:
    """The median step after the first (verify's mean is swayed by one slow step)."""
    return result.get("step_seconds_median", result["step_seconds"])
