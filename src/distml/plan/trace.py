"""What one training step of a model costs, read off the model itself: it runs once on the
meta device (shapes and dtypes, no data, no memory), so any model works, a user's included,
with no formula per model family.

- memory: parameter, gradient and optimizer-state bytes (the optimizer really steps on the
  meta parameters, so its state is what it allocates), and activations: the tensors autograd
  saves for backward (``saved_tensors_hooks``, each storage once, parameters excluded), with
  activation checkpointing off and on;
- work: FLOPs of forward and backward (``FlopCounterMode``), and the number of operators and
  the bytes they write (a dispatch mode), for forward+backward and the optimizer step;
- per pipeline layer (a model that a pipeline can cut): parameters, forward FLOPs, saved
  activations and output bytes (what a stage sends to the next);
- per module of the model's tensor plan: its parameters, and the bytes of its input and
  output (what tensor parallelism all-reduces).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from distml.distributed.strategy import checkpoint_blocks, shard_units

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """Operators run, FLOPs and bytes written by them."""

    ops: int = 0
    flops: int = 0
    bytes: int = 0

    def scaled(self, f: float) -> Work:
        return Work(round(self.ops * f), round(self.flops * f), round(self.bytes * f))

    def __add__(self, other: Work) -> Work:
        return Work(self.ops + other.ops, self.flops + other.flops, self.bytes + other.bytes)


@dataclass
class LayerTrace:
    param_bytes: int
    forward_flops: int
    activation_bytes: int  # saved for backward
    output_bytes: int  # sent to the next stage


@dataclass
class TensorModule:
    """A module of the tensor plan: how it is split and what crosses its boundary."""

    style: str  # ColwiseParallel, RowwiseParallel, ...
    param_bytes: int
    sharded_bytes: int  # of param_bytes, the part split over the tensor axis
    input_bytes: int
    output_bytes: int


@dataclass
class ModelTrace:
    """One step at ``batch`` samples (one rank's micro-batch of a data-parallel replica)."""

    batch: int
    params: list[tuple[str, tuple[int, ...], int]]  # (name, shape, bytes), each tensor once
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: list[int]  # per parameter, in params' order
    activation_bytes: int
    activation_bytes_checkpointed: int
    step: Work  # forward + backward
    forward_flops: int
    optimizer_step: Work
    units: list[list[int]] = field(default_factory=list)  # FSDP units: indices into params
    layers: list[LayerTrace] = field(default_factory=list)
    tensor: list[TensorModule] = field(default_factory=list)


class _Counter(TorchDispatchMode):
    """Counts operators and the bytes of their outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.work.ops += 1
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.work.bytes += t.numel() * t.element_size()
        return out


def _saved_storages(fn: Callable[[], Any], exclude: set[int]) -> tuple[Any, int]:
    """Run ``fn``; the bytes of the tensors autograd saved meanwhile (each storage once)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st._cdata not in exclude:
            saved[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def _storage_ids(model: nn.Module) -> set[int]:
    return {p.untyped_storage()._cdata for p in [*model.parameters(), *model.buffers()]}


def meta_batch(sample: tuple[torch.Tensor, torch.Tensor], batch: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of ``batch`` rows shaped and typed like the sample's rows, on the meta device."""
    x, y = sample
    return (torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta"),
            torch.empty((batch, *y.shape[1:]), dtype=y.dtype, device="meta"))


def trace_step(model: nn.Module, sample: tuple[torch.Tensor, torch.Tensor], *, batch: int,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               make_optimizer: Callable[[Any], torch.optim.Optimizer],
               grad_clip: float | None, autocast: torch.dtype | None = None) -> ModelTrace:
    """Trace one training step of ``model`` (left untouched) at ``batch`` samples."""
    meta = to_meta(model)
    x, y = meta_batch(sample, batch)
    params = _unique_params(meta)
    exclude = _storage_ids(meta)
    counter = _Counter()
    with FlopCounterMode(display=False) as flops, counter:
        with _autocast(autocast):
            out, acts = _saved_storages(lambda: loss(meta(x), y), exclude)
        forward_flops = flops.get_total_flops()
        out.backward()
    step = Work(counter.work.ops, flops.get_total_flops(), counter.work.bytes)
    opt = make_optimizer([p for _, p in params])
    counter = _Counter()
    with counter:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], grad_clip)
        opt.step()
    opt_bytes = [sum(v.numel() * v.element_size() for v in opt.state.get(p, {}).values()
                     if isinstance(v, torch.Tensor)) for _, p in params]
    return ModelTrace(
        batch=batch, params=[(n, tuple(p.shape), _nbytes(p)) for n, p in params],
        param_bytes=sum(_nbytes(p) for _, p in params),
        grad_bytes=sum(_nbytes(p) for _, p in params if p.requires_grad),
        optimizer_bytes=opt_bytes, activation_bytes=acts,
        activation_bytes_checkpointed=_checkpointed_activations(model, x, y, loss, autocast),
        step=step, forward_flops=forward_flops, optimizer_step=counter.work,
        units=_units(meta, params), layers=_layers(model, x, autocast),
        tensor=_tensor_modules(model, x, autocast))


def to_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device, tied parameters still tied (``Module.to``
    makes a new parameter per module when the device changes, so an embedding tied to the
    head would count twice)."""
    meta = copy.deepcopy(model)
    made: dict[int, nn.Parameter] = {}
    for module in meta.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                           requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to("meta")
    return meta


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _autocast(dtype: torch.dtype | None) -> Any:
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def _checkpointed_activations(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                              loss: Callable, autocast: torch.dtype | None) -> int:
    """Saved activations with each block checkpointed (what backward then recomputes is
    transient: one block's at a time, which this leaves out)."""
    meta = to_meta(model)
    checkpoint_blocks(meta)
    with _autocast(autocast):
        _, acts = _saved_storages(lambda: loss(meta(x), y), _storage_ids(meta))
    return acts


def _units(meta: nn.Module, params: list[tuple[str, nn.Parameter]]) -> list[list[int]]:
    """FSDP's units (distml shards each block, then the root the rest): parameter indices,
    the root's last."""
    index = {id(p): i for i, (_, p) in enumerate(params)}
    units, taken = [], set()
    for unit in shard_units(meta):
        ids = [index[id(p)] for p in unit.parameters() if id(p) in index and
               index[id(p)] not in taken]
        taken.update(ids)
        units.append(ids)
    units.append([i for i in range(len(params)) if i not in taken])
    return units


def _layers(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None
            ) -> list[LayerTrace]:
    """Each pipeline layer run in turn on the meta batch (empty: not a sequence of layers)."""
    from distml.distributed.model_parallel import pipeline_layers

    meta = to_meta(model)
    try:
        layers = pipeline_layers(meta)
    except Exception:  # noqa: BLE001 - not a pipeline-able model: no per-layer view
        return []
    out, exclude = [], _storage_ids(meta)
    for fn, paths in layers:
        with FlopCounterMode(display=False) as flops, _autocast(autocast):
            x, acts = _saved_storages(lambda fn=fn, x=x: fn(x), exclude)
        size = sum(_nbytes(p) for path in paths
                   for p in meta.get_submodule(path).parameters(recurse=True))
        out.append(LayerTrace(size, flops.get_total_flops(), acts, _nbytes(x)))
    return out


def _tensor_modules(model: nn.Module, x: torch.Tensor, autocast: torch.dtype | None
                    ) -> list[TensorModule]:
    """The tensor plan's modules, with the bytes of what enters and leaves each."""
    plan_of = getattr(model, "tensor_plan", None)
    if plan_of is None:
        return []
    meta = to_meta(model)
    plan, found = plan_of(), {}

    def hook(path: str) -> Callable:
        def record(_m: nn.Module, args: tuple, out: Any) -> None:
            found[path] = (sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor)),
                           _nbytes(out) if isinstance(out, torch.Tensor) else 0)
        return record

    handles = [meta.get_submodule(p).register_forward_hook(hook(p)) for p in plan]
    with torch.no_grad(), _autocast(autocast):
        meta(x)
    for h in handles:
        h.remove()
    return [_tensor_module(meta.get_submodule(p), type(style).__name__, *found.get(p, (0, 0)))
            for p, style in plan.items()]


def _tensor_module(module: nn.Module, style: str, inp: int, out: int) -> TensorModule:
    """Colwise splits every parameter (weight rows and bias); Rowwise the weight only (its
    bias is added once, after the all-reduce); other styles: counted as not split."""
    total = sum(_nbytes(p) for p in module.parameters())
    if style == "ColwiseParallel":
        sharded = total
    elif style == "RowwiseParallel":
        sharded = sum(_nbytes(p) for n, p in module.named_parameters() if n != "bias")
    else:
        sharded = 0
    return TensorModule(style, total, sharded, inp, out)
