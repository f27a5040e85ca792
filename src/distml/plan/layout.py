"""Which part of the model each rank holds under a strategy and degree split, from the
traced step (``trace.ModelTrace``) and the mesh's degrees (``ParallelDims``).

Composed axis by axis in the order distml applies them: the pipeline axis cuts the layers
into stages (as ``model_parallel.plan_stages`` does: by parameters, by time, or as given),
the tensor axis splits the modules of the model's tensor plan, and the data axis either
replicates what is left (ddp, pipeline replicas), shards the optimizer state (zero1:
one flat buffer, each rank's optimizer stepping its contiguous slice) or shards everything
(fsdp, tensor's data axis: fully_shard pads each tensor's first dimension to the degree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distml.config import ParallelDims, TrainSettings
from distml.plan.trace import ModelTrace

# How a strategy treats its data axis; strategies not listed replicate over it.
DATA_AXIS = {"zero1": "optimizer", "fsdp": "full", "tensor": "full", "3d": "full"}


@dataclass(frozen=True)
class RankShare:
    """One rank's share of the model: fractions of the whole, and its stage's layers."""

    params: float  # fraction of the model's parameter bytes before the data axis
    flops: float  # fraction of the step's FLOPs it computes (before the data axis)
    layers: tuple[int, ...]  # pipeline layers it holds (all when there is no pipeline)
    stage_index: int  # its first stage's index (0: the first stage)


def stage_sizes(trace: ModelTrace, settings: TrainSettings, stages: int) -> list[int]:
    """Layers per stage as the pipeline strategy cuts them."""
    from distml.distributed.model_parallel import split_stages

    split = settings.parallel.pipeline.stage_split
    if isinstance(split, list):
        return split
    costs = [float(layer.param_bytes or 1) if split == "params" else float(layer.forward_flops
             or 1) for layer in trace.layers]
    return split_stages(costs, stages)


def pipeline_shares(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims
                    ) -> list[RankShare]:
    """Each pipeline rank's layers (round-robin over virtual stages)."""
    if dims.pipeline == 1 or not trace.layers:
        return [RankShare(1.0, 1.0, tuple(range(len(trace.layers))), 0)]
    per_rank = settings.parallel.pipeline.stages_per_rank
    sizes = stage_sizes(trace, settings, dims.pipeline * per_rank)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    # of the whole model: a tied weight is in two stages, and each holds a copy
    total_p = trace.param_bytes or 1
    total_f = sum(layer.forward_flops for layer in trace.layers) or 1
    shares = []
    for r in range(dims.pipeline):
        mine = tuple(i for s in range(r, len(sizes), dims.pipeline)
                     for i in range(starts[s], starts[s + 1]))
        shares.append(RankShare(sum(trace.layers[i].param_bytes for i in mine) / total_p,
                                sum(trace.layers[i].forward_flops for i in mine) / total_f,
                                mine, r))
    return shares


def tensor_fraction(trace: ModelTrace, degree: int) -> float:
    """The fraction of parameter bytes a tensor rank keeps."""
    if degree == 1 or not trace.tensor:
        return 1.0
    sharded = sum(m.sharded_bytes for m in trace.tensor)
    return 1.0 - sharded / max(trace.param_bytes, 1) * (1.0 - 1.0 / degree)


def _padded(shape: tuple[int, ...], nbytes: int, degree: int) -> int:
    """fully_shard's local bytes of a tensor: dim 0 padded to a multiple of the degree."""
    if not shape:
        return nbytes
    row = nbytes // max(shape[0], 1)
    return math.ceil(shape[0] / degree) * row


def flat_shard(trace: ModelTrace, degree: int) -> tuple[int, int]:
    """zero1's flat buffer (every parameter a view of it, padded to a multiple of the
    degree) and one rank's optimizer state for its contiguous slice: each per-element
    state at the slice's length, one scalar step counter."""
    elements = sum(math.prod(shape) for _, shape, _ in trace.params)
    if not elements:
        return 0, 0
    size = trace.param_bytes // elements  # bytes per element
    shard = -(-elements // degree)
    steps = 4 * len(trace.params) if any(trace.optimizer_bytes) else 0
    per_element = (sum(trace.optimizer_bytes) - steps) / elements
    return shard * degree * size, round(per_element * shard) + (4 if steps else 0)


def model_state(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims,
                share: RankShare, data_rank: int) -> dict[str, int]:
    """Bytes a rank holds at the step's fullest moment (what ``Strategy.held_bytes`` reads
    after forward and after backward): params (FSDP's gathered copies included), grads,
    optimizer."""
    f = share.params * tensor_fraction(trace, dims.tensor)
    p, g, o = trace.param_bytes * f, trace.grad_bytes * f, sum(trace.optimizer_bytes) * f
    how = DATA_AXIS.get(dims.strategy, "replicate") if dims.data > 1 else "replicate"
    if dims.servers:
        return _server_or_worker(trace, dims, data_rank)
    if how == "optimizer":
        flat, o = flat_shard(trace, dims.data)
        p, o = flat * f, o * f
    if how != "full":
        return {"params": round(p), "grads": round(g), "optimizer": round(o)}
    shard = sum(_padded(shape, n, dims.data) for _, shape, n in trace.params) * f
    # optimizer state (minus the scalar step counters, which are never sharded)
    steps = 4 * len(trace.params) if settings.optimizer == "adamw" else 0
    o = (sum(trace.optimizer_bytes) - steps) * shard / max(trace.param_bytes, 1) + steps
    keep = not settings.parallel.fsdp.reshard_after_forward and dims.strategy == "fsdp"
    root = sum(trace.params[i][2] for i in trace.units[-1]) if trace.units else 0
    gathered = p if keep else root * f  # unsharded copies alive after forward
    grads = shard * g / max(p, 1)
    if gathered > grads:  # the fullest moment: after forward
        return {"params": round(shard + gathered), "grads": 0, "optimizer": round(o)}
    return {"params": round(shard), "grads": round(grads), "optimizer": round(o)}


def _server_or_worker(trace: ModelTrace, dims: ParallelDims, data_rank: int
                      ) -> dict[str, int]:
    """Parameter servers: servers hold equal byte ranges of parameters and the optimizer
    state, workers the whole model and its gradients."""
    if data_rank < dims.servers:
        return {"params": trace.param_bytes // dims.servers, "grads": 0,
                "optimizer": sum(trace.optimizer_bytes) // dims.servers}
    return {"params": trace.param_bytes, "grads": trace.grad_bytes, "optimizer": 0}


def activations(trace: ModelTrace, settings: TrainSettings, dims: ParallelDims,
                share: RankShare) -> int:
    """Activations a rank keeps for backward at its fullest: its micro-batch's (checkpointed
    or not), its layers' only under a pipeline, times the micro-batches in flight there."""
    whole = (trace.activation_bytes_checkpointed if settings.activation_checkpointing
             else trace.activation_bytes)
    t = tensor_fraction(trace, dims.tensor)
    if dims.pipeline == 1 or not trace.layers:
        return round(whole * t)
    mine = sum(trace.layers[i].activation_bytes for i in share.layers)
    everything = sum(layer.activation_bytes for layer in trace.layers) or 1
    pp = settings.parallel.pipeline
    in_flight = pp.num_microbatches if pp.schedule == "gpipe" else min(
        pp.num_microbatches, dims.pipeline - share.stage_index)
    return round(whole * mine / everything * in_flight * t)
