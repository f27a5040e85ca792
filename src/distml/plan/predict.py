"""The plans: every strategy of the strategy table, every variant it lists (fsdp's ZeRO-2,
pipeline schedules) and every split of each world size up to the largest given into the
degrees the strategy reads (data x tensor, data x pipeline, data x tensor x pipeline...),
each checked by the config's own validation (so a new strategy and its degrees are picked
up from the table and ``ParallelDims``), with activation checkpointing off and on. Each
valid plan gets per-rank memory and step time; those over the memory budget are rejected
with the reason, and the others ranked by step time.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ValidationError
from torch import nn

from distml.config import Candidate, ParallelDims, TrainSettings, deep_merge
from distml.config.parallel import applicable
from distml.config.strategies import STRATEGIES, StrategyRecord
from distml.plan.calibrate import Machine
from distml.plan.layout import activations, model_state, pipeline_shares
from distml.plan.steptime import step_time
from distml.plan.trace import ModelTrace

logger = logging.getLogger(__name__)

GIB = 2**30
MODEL_AXES = ("tensor_degree", "pipeline")  # the degrees a strategy may read besides data


@dataclass
class Plan:
    candidate: str
    name: str  # the variant (distml verify's name for it)
    strategy: str
    world_size: int
    degrees: dict[str, int]  # data, tensor, pipeline, servers
    activation_checkpointing: bool
    parallel: dict[str, Any]  # the train.parallel settings that make it
    memory_per_rank: list[dict[str, int]] = field(default_factory=list)
    step_seconds: float = 0.0
    compute_s: float = 0.0
    communication_s: float = 0.0
    bubble_s: float = 0.0
    fits: bool = True
    why_not: str | None = None

    @property
    def peak_bytes(self) -> int:
        return max((m["total"] for m in self.memory_per_rank), default=0)

    @property
    def label(self) -> str:
        d = self.degrees
        split = "x".join(f"{k[0]}{v}" for k, v in d.items() if v > 1 or k == "data")
        return f"{self.name} w{self.world_size} {split}" + (" +ckpt" if
                                                            self.activation_checkpointing else "")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_bytes": self.peak_bytes, "label": self.label}


def _divisor_splits(world: int, n: int) -> list[tuple[int, ...]]:
    """Ways to write world as data x (n model degrees, each >= 2)."""
    degrees = [d for d in range(2, world + 1) if world % d == 0]
    return [combo for combo in itertools.product(degrees, repeat=n)
            if world % _prod(combo) == 0]


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def layouts(record: StrategyRecord, world: int) -> list[dict[str, Any]]:
    """The parallel settings of each degree split of ``world`` that the strategy reads."""
    if not record.distributed:
        return [{}] if world == 1 else []
    if world == 1:
        return []
    if record.servers:
        return [{"parameter_server": {"num_servers": s}}
                for s in sorted({1, world // 2}) if 0 < s < world]
    axes = [a for a in MODEL_AXES if a in record.reads]
    out = []
    for combo in _divisor_splits(world, len(axes)) if axes else [()]:
        data = world // _prod(combo)
        if data > 1 and axes and "data_degree" not in record.reads:
            continue
        settings: dict[str, Any] = {"data_degree": data} if axes else {}
        for axis, degree in zip(axes, combo, strict=True):
            settings = deep_merge(settings, {"pipeline": {"degree": degree}}
                                  if axis == "pipeline" else {axis: degree})
        out.append(settings)
    return out


def candidates_of(base: TrainSettings, world_size: int
                  ) -> list[tuple[str, dict[str, Any]]]:
    """(variant name, parallel settings) of every plan to consider."""
    found = []
    for record in STRATEGIES.values():
        variants = {n: v for n, v in record.variants.items()
                    if not {"data_degree", "tensor_degree"} & set(v)} or {record.name: {}}
        for world in range(1, world_size + 1):
            for layout in layouts(record, world):
                for name, variant in variants.items():
                    found.append((name, deep_merge(deep_merge(
                        {"strategy": record.name, "world_size": world}, variant), layout)))
    return found


def settings_of(base: TrainSettings, parallel: dict[str, Any], checkpointing: bool
                ) -> TrainSettings:
    """The candidate's settings under another layout; ValueError when it is invalid."""
    own = base.parallel.model_dump()
    own.update(data_degree=None, tensor_degree=None, num_nodes=1)
    own["pipeline"]["degree"] = None
    merged = applicable(deep_merge(own, parallel), parallel["strategy"])
    data = {**base.model_dump(exclude={"parallel"}), "parallel": merged,
            "activation_checkpointing": checkpointing}
    try:
        return TrainSettings(**data)
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


Tracer = Callable[[int], ModelTrace]  # micro-batch rows -> the traced step


def predict(plan: Plan, settings: TrainSettings, trace_at: Tracer,
            machine_for: Callable[[int], tuple[Machine, float]]) -> Plan:
    """Fill in the plan's per-rank memory and step time."""
    dims = settings.dims
    micro_steps = settings.parallel.pipeline.num_microbatches if dims.pipeline > 1 \
        else settings.grad_accum_steps
    trace = trace_at(max(settings.batch_size // (dims.data * micro_steps), 1))
    machine, slowdown = machine_for(dims.world_size)
    times = []
    for share in pipeline_shares(trace, settings, dims):
        acts = activations(trace, settings, dims, share)
        t = step_time(trace, settings, dims, share, machine, micro_steps=micro_steps)
        times.append(t)
        for data_rank in range(dims.data + dims.servers):
            state = model_state(trace, settings, dims, share, data_rank)
            plan.memory_per_rank += [{**state, "activations": acts,
                                      "total": sum(state.values()) + acts}] * dims.tensor
    slow = max(times, key=lambda t: t.total_s)
    plan.compute_s, plan.communication_s = slow.compute_s * slowdown, slow.communication_s
    plan.bubble_s = slow.bubble_s * slowdown
    plan.step_seconds = plan.compute_s + plan.communication_s + plan.bubble_s
    return plan


def make_plans(cand: Candidate, base: TrainSettings, model: nn.Module, *, world_size: int,
               trace_at: Tracer, machine_for: Callable[[int], tuple[Machine, float]],
               memory_bytes: int | None) -> tuple[list[Plan], list[dict[str, str]]]:
    """Every valid plan (ranked: fitting ones by step time first), and the layouts that
    are not valid for this candidate with the config's reason."""
    plans, invalid, seen = [], [], set()
    for name, parallel in candidates_of(base, world_size):
        for ckpt in (False, True):
            try:
                s = settings_of(base, parallel, ckpt)
                s.check_model(cand.model)
                _check_built(model, s.dims)
            except ValueError as e:
                if not ckpt:
                    invalid.append({"plan": f"{name} w{parallel['world_size']}",
                                    "parallel": str(parallel), "why": str(e)})
                continue
            same = (ckpt, s.parallel.model_dump_json())
            if same in seen:  # a variant the candidate's own settings already are
                continue  # ("pipeline" with its default schedule is "pipeline-1f1b")
            seen.add(same)
            d = s.dims
            plan = Plan(cand.name, name, s.parallel.strategy, d.world_size,
                        _degrees(d), ckpt, parallel)
            predict(plan, s, trace_at, machine_for)
            if memory_bytes is not None and plan.peak_bytes > memory_bytes:
                plan.fits, plan.why_not = False, _too_big(plan, memory_bytes)
            plans.append(plan)
    plans.sort(key=lambda p: (not p.fits, p.step_seconds))
    return plans, invalid


def _check_built(model: nn.Module, dims: ParallelDims) -> None:
    """What the config cannot know of a user's model: whether it has a tensor plan, or
    layers a pipeline can cut (the strategies would refuse it when they start)."""
    from distml.distributed.model_parallel import pipeline_layers
    from distml.errors import DistmlError

    if dims.tensor > 1 and getattr(model, "tensor_plan", None) is None:
        raise ValueError(f"strategy tensor: {type(model).__name__} has no tensor_plan(); "
                         "define one or use ddp or fsdp")
    if dims.pipeline > 1:
        try:
            layers = len(pipeline_layers(model))
        except DistmlError as e:
            raise ValueError(str(e)) from None
        if layers < dims.pipeline:
            raise ValueError(f"{dims.pipeline} pipeline stages is more than the model's "
                             f"{layers} layers")


def _degrees(d: ParallelDims) -> dict[str, int]:
    out = {"data": d.data, "tensor": d.tensor, "pipeline": d.pipeline}
    if d.servers:
        out["servers"] = d.servers
    return out


def _too_big(plan: Plan, limit: int) -> str:
    rank, worst = max(enumerate(plan.memory_per_rank), key=lambda rm: rm[1]["total"])
    parts = ", ".join(f"{k} {v / GIB:.3g}" for k, v in worst.items() if k != "total" and v)
    return (f"rank {rank} needs {worst['total'] / GIB:.3g} GiB ({parts}) > "
            f"{limit / GIB:.3g} GiB")
