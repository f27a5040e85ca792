"""A step's time on one rank: compute from the traced work (FLOPs at the machine's rate,
bytes at its memory bandwidth, a fixed cost per operator), communication from the messages
the strategy sends (ring collectives at the network's bandwidth and latency), the
pipeline's bubble from its schedule, and each wrapper's measured overhead per step and per
unit it works per (``distml.plan.overhead``). Compute and communication are added, not
overlapped: on CPU ranks share the cores that gloo's copies run on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distml.config import ParallelDims, TrainSettings
from distml.config.strategies import VARIANTS
from distml.plan.calibrate import Machine
from distml.plan.layout import DATA_AXIS, RankShare, tensor_fraction
from distml.plan.trace import ModelTrace, Work

# torch DDP's gradient buckets: the first 1 MiB, then 25 MiB each (bucket_cap_mb)
DDP_FIRST_BUCKET, DDP_BUCKET = 2**20, 25 * 2**20


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float
    bubble_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.bubble_s


def seconds(work: Work, m: Machine) -> float:
    return work.flops / m.flops_per_s + work.bytes / m.memory_bytes_per_s + \
        work.ops * m.op_seconds


def _ring(nbytes: float, ranks: int, m: Machine, kind: str) -> float:
    """A ring all-reduce moves 2(n-1)/n of the bytes, an all-gather or reduce-scatter
    (n-1)/n; each in 2(n-1) or n-1 messages; times the collective's measured factor (gloo's
    reduce-scatter is an all-reduce underneath)."""
    if ranks <= 1:
        return 0.0
    hops = 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1
    return (hops / ranks * nbytes / m.network_bytes_per_s + hops * m.network_latency_s) * \
        m.factor(kind)


def _data_axis_comm(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims,
                    share: RankShare, m: Machine) -> float:
    f = share.params * tensor_fraction(trace, dims.tensor)
    grads, params = trace.grad_bytes * f, trace.param_bytes * f
    if dims.servers:  # a worker pushes its gradient and pulls the parameters
        workers_per_server = max(dims.data / dims.servers, 1)
        return 2 * params / m.network_bytes_per_s * workers_per_server + \
            2 * dims.servers * m.network_latency_s
    how = DATA_AXIS.get(dims.strategy, "replicate")
    if how in ("replicate", "optimizer"):  # DDP's buckets, each all-reduced
        buckets = 1 + math.ceil(max(grads - DDP_FIRST_BUCKET, 0) / DDP_BUCKET)
        reduce = _ring(grads, dims.data, m, "all_reduce") + \
            (buckets - 1) * _ring(0, dims.data, m, "all_reduce")
        # zero1: then one all-gather of the flat parameter buffer, each rank's slice stepped
        return reduce + (_ring(params, dims.data, m, "all_gather")
                         if how == "optimizer" else 0.0)
    gathers = 1 if not settings.parallel.fsdp.reshard_after_forward and \
        dims.strategy == "fsdp" else 2
    units = max(len(trace.units), 1)
    return gathers * _ring(params, dims.data, m, "all_gather") + \
        _ring(grads, dims.data, m, "reduce_scatter") + \
        (gathers + 1) * units * (dims.data - 1) * m.network_latency_s


def _tensor_axis_comm(trace: ModelTrace, dims: ParallelDims, share: RankShare,
                      m: Machine, forwards: int) -> float:
    """Row-wise modules all-reduce their output in forward, column-wise ones their
    input's gradient in backward."""
    if dims.tensor == 1:
        return 0.0
    total = 0.0
    for mod in trace.tensor:
        if mod.style == "RowwiseParallel":
            total += forwards * _ring(mod.output_bytes, dims.tensor, m, "all_reduce")
        elif mod.style == "ColwiseParallel":
            total += _ring(mod.input_bytes, dims.tensor, m, "all_reduce")
    return total * share.params


def step_time(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims,
              share: RankShare, m: Machine, *, micro_steps: int) -> StepTime:
    """``trace`` is of one micro-batch of this rank (a pipeline's micro-batch, or a data
    rank's batch / grad_accum_steps); ``micro_steps`` of them make the step."""
    forwards = 2 if settings.activation_checkpointing else 1
    fwd_share = trace.forward_flops / max(trace.step.flops, 1)
    per_micro = trace.step + trace.step.scaled(fwd_share * (forwards - 1))
    t_fraction = tensor_fraction(trace, dims.tensor)
    flops_share = share.flops * t_fraction
    micro = Work(round(per_micro.ops * (share.flops if dims.pipeline > 1 else 1)),
                 round(per_micro.flops * flops_share), round(per_micro.bytes * flops_share))
    opt_fraction = share.params * t_fraction / (
        dims.data if DATA_AXIS.get(dims.strategy) in ("optimizer", "full") else 1)
    if dims.servers:
        opt_fraction = 0.0  # the servers step the optimizer
    compute = micro_steps * seconds(micro, m) + \
        seconds(trace.optimizer_step.scaled(opt_fraction), m)
    bubble = 0.0
    if dims.pipeline > 1:
        pp = settings.parallel.pipeline
        v = pp.stages_per_rank
        bubble = (dims.pipeline - 1) / v * seconds(micro, m)
    comm = _data_axis_comm(trace, settings, dims, share, m) + micro_steps * (
        _tensor_axis_comm(trace, dims, share, m, forwards) + _pipeline_comm(trace, dims, m)) \
        + overhead(trace, settings, dims, share, m, micro_steps)
    return StepTime(compute, comm, bubble)


def axis_overheads(settings: TrainSettings, dims: ParallelDims) -> list[tuple[str, str]]:
    """(calibrated variant, kind) of each axis the plan spreads over: the wrapper whose
    measured overhead (``Machine.overheads``) the step pays on it."""
    if dims.servers:
        return [("ps-sync", "servers")]
    out = []
    how = DATA_AXIS.get(dims.strategy, "replicate")
    if dims.data > 1:
        zero2 = dims.strategy == "fsdp" and not settings.parallel.fsdp.reshard_after_forward
        out.append(({"optimizer": "zero1", "full": "fsdp-zero2" if zero2 else "fsdp"}
                    .get(how, "ddp"), how))
    if dims.tensor > 1:
        out.append(("tensor", "tensor"))
    if dims.pipeline > 1:
        schedule = settings.parallel.pipeline.schedule
        out.append((next((n for n, v in VARIANTS.items() if n.startswith("pipeline") and
                          v.get("pipeline", {}).get("schedule") == schedule), "pipeline"),
                    "pipeline"))
    return out


def units(kind: str, trace: ModelTrace, settings: TrainSettings, micro_steps: int) -> int:
    """How many of what a ``kind`` wrapper works per a step of ``trace`` has: FSDP units,
    tensor-parallel modules, pipeline actions (micro-batches x stages per rank), or
    parameter tensors (ddp's and zero1's hooks and buckets, the servers' messages)."""
    if kind == "full":
        return len(trace.units)
    if kind == "tensor":
        return len(trace.tensor)
    if kind == "pipeline":
        return micro_steps * settings.parallel.pipeline.stages_per_rank
    return len(trace.params)


def overhead(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims, share: RankShare,
             m: Machine, micro_steps: int) -> float:
    """What the wrappers add to the step beyond compute and message bytes: per axis, the
    measured cost per step and per unit (see ``distml.plan.overhead``); a pipeline or
    tensor rank's units are its share of the model's."""
    measured = {name: (per_step, per_unit) for name, per_step, per_unit in m.overheads}
    total = 0.0
    for key, kind in axis_overheads(settings, dims):
        per_step, per_unit = measured.get(key, (0.0, 0.0))
        n = units(kind, trace, settings, micro_steps)
        if kind in ("full", "replicate", "optimizer") and dims.pipeline > 1:
            n *= share.params  # a stage's own parameters and units
        total += per_step + per_unit * n
    return total


def _pipeline_comm(trace: ModelTrace, dims: ParallelDims, m: Machine) -> float:
    """Per micro-batch: a stage's output forward and its gradient back, at each boundary
    the rank touches (at most two)."""
    if dims.pipeline == 1 or not trace.layers:
        return 0.0
    boundary = max(layer.output_bytes for layer in trace.layers[:-1]) if \
        len(trace.layers) > 1 else 0
    return 2 * 2 * (boundary / m.network_bytes_per_s + m.network_latency_s)
