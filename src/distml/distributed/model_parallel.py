"""Model parallelism: the model itself split across ranks, on a 2-D device mesh
(data x tensor, or data x pipeline; the model axis innermost, so its ranks are neighbours).

- ``tensor``: each layer's matrix multiplications are split across the tensor ranks
  (torch.distributed.tensor.parallel, with the plan the model defines next to itself:
  ``tensor_plan()``); with ``data_degree > 1``, FSDP shards the result over the data axis.
- ``pipeline``: the model's layers (``pipeline_layers()``, or an ``nn.Sequential``'s
  children) are cut into contiguous stages, one per pipeline rank, and each optimizer step's
  batch is cut into micro-batches that flow through the stages under a GPipe or 1F1B
  schedule (torch.distributed.pipelining); with ``data_degree > 1``, each stage's gradients
  are averaged over the replicas of that stage.

Parameter names stay canonical: a stage keeps the whole model object with the other stages'
layers replaced by empty ``nn.Identity`` modules, so checkpoints (torch.distributed.checkpoint)
load under any strategy and world size, and ``full_state_dict`` gathers a normal model.
Both on one 3-D mesh (data x pipeline x tensor): distml.distributed.mesh3d.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, Replicate

from distml.distributed.data_parallel import apply_fsdp
from distml.distributed.runtime import gather_objects
from distml.distributed.strategy import Batch, LossFn, Strategy
from distml.errors import DistmlError

Layer = tuple[Callable[[torch.Tensor], torch.Tensor], list[str]]


def global_norm_clip(params: list[nn.Parameter], max_norm: float,
                     copies: Callable[[nn.Parameter], int], also: list[nn.Parameter] = ()
                     ) -> float:
    """Clip by the norm of the whole model's gradient, wherever its pieces live: each rank
    adds the squares of the gradient it holds divided by how many ranks hold the same piece
    (``copies``), and one all-reduce sums them. ``also``: gradients scaled alike but not
    counted (a second copy of a tied parameter)."""
    grads = [(p, getattr(p.grad, "_local_tensor", p.grad)) for p in params if p.grad is not None]
    device = grads[0][1].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for p, g in grads:
        sq += g.detach().double().pow(2).sum() / copies(p)
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for _, g in grads:
            g.mul_(scale)
        for p in also:
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def _replication(p: nn.Parameter, world: int) -> int:
    """How many ranks hold the same values as this rank for ``p``."""
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        replicated = math.prod(mesh.size(i) for i, pl in enumerate(p.placements)
                               if isinstance(pl, Replicate))
        return replicated * world // mesh.size()
    return world


class TensorParallel(Strategy):
    name = "tensor"

    def parallelize(self, model: nn.Module) -> nn.Module:
        from torch.distributed.tensor.parallel import parallelize_module

        return parallelize_module(model, self.mesh["tensor"], tensor_plan(model, self.name))

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.mesh["data"].size() == 1:
            return model
        # data x tensor: FSDP over the data axis of the same mesh (2-D parallelism).
        return apply_fsdp(model, self.mesh["data"])

    def sync_gradients(self, sync: bool):
        if self.mesh["data"].size() > 1:
            self.model.set_requires_gradient_sync(sync)
        return super().sync_gradients(sync)

    def clip_gradients(self, max_norm: float) -> None:
        world = self.env.world_size
        global_norm_clip(list(self.model.parameters()), max_norm,
                         lambda p: _replication(p, world))


def tensor_plan(model: nn.Module, strategy: str) -> dict[str, Any]:
    """The model's tensor-parallel plan (module path -> ColwiseParallel / RowwiseParallel)."""
    if not hasattr(model, "tensor_plan"):
        raise DistmlError(f"strategy {strategy}: {type(model).__name__} has no tensor_plan(); "
                          "define one (a dict of module path -> ColwiseParallel / "
                          "RowwiseParallel) or use ddp or fsdp")
    return model.tensor_plan()


# -- pipeline ---------------------------------------------------------------------------------

def pipeline_layers(model: nn.Module) -> list[Layer]:
    """The model as (callable, owned module paths) in forward order."""
    if hasattr(model, "pipeline_layers"):
        return model.pipeline_layers()
    if isinstance(model, nn.Sequential):
        return [(m, [name]) for name, m in model.named_children()]
    raise DistmlError(f"strategy pipeline: {type(model).__name__} is not a sequence of blocks; "
                      "make it an nn.Sequential or give it pipeline_layers(), or use ddp or "
                      "fsdp")


def split_stages(costs: list[float], stages: int) -> list[int]:
    """Layers per stage: contiguous, every stage non-empty, minimising the largest stage's
    cost (the pipeline runs at the pace of its slowest stage)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the smallest possible maximum over the first i layers in k stages.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(stages, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def _layer_costs(model: nn.Module, layers: list[Layer], how: str, sample: torch.Tensor
                 ) -> list[float]:
    """Parameters per layer, or its measured forward time on a sample batch (GPipe's
    heuristic); measured on every rank alike, then the ranks' timings are averaged."""
    if how == "params":
        return [float(sum(p.numel() for path in paths
                          for p in model.get_submodule(path).parameters())) or 1.0
                for _, paths in layers]
    if sample is None:
        raise DistmlError("stage_split: time needs sample input rows to time the layers on")
    costs, x = [], sample
    with torch.no_grad():
        for fn, _ in layers:
            start = time.perf_counter()
            for _ in range(3):
                out = fn(x)
            costs.append(time.perf_counter() - start)
            x = out
    t = torch.tensor(costs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class _Stage(nn.Module):
    """One stage's forward: its layers in order. Its parameters (what the pipeline scales
    and zeroes per stage) are those of the modules the layers own; the strategy's state
    still comes from the model, under the model's own names."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        super().__init__()
        self.owned = nn.ModuleList(model.get_submodule(p) for _, paths in layers for p in paths)
        self.fns = [fn for fn, _ in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            x = fn(x)
        return x


@dataclass(frozen=True)
class StagePlan:
    """Where the pipeline's stages live, seen from this rank."""

    ranks: int  # pipeline ranks (K)
    pp_rank: int  # this rank's place among them
    group: Any  # the pipeline axis' process group
    num_stages: int  # K x stages per rank
    my_stages: list[int]  # rank r holds stages r, r + K, ... (round-robin)
    layer_ranges: list[tuple[int, int]]  # [start, end) layers of each of my stages
    stage_of: dict[str, int]  # module path -> stage
    tied: list[tuple[nn.Parameter, Any, bool]]  # see _tie_groups
    aliases: dict[str, str]  # this rank's name of a tied parameter -> the canonical one


def plan_stages(model: nn.Module, mesh: Any, pp: Any, sample: torch.Tensor | None
                ) -> StagePlan:
    """Cut the model's layers into contiguous stages (by parameters, measured time or the
    given sizes) and deal them to the pipeline ranks."""
    axis = mesh["pipeline"]
    ranks, pp_rank = axis.size(), axis.get_local_rank()
    num_stages = ranks * pp.stages_per_rank
    my_stages = [pp_rank + k * ranks for k in range(pp.stages_per_rank)]
    layers = pipeline_layers(model)
    if num_stages > len(layers):
        raise DistmlError(f"{num_stages} pipeline stages is more than the model's "
                          f"{len(layers)} layers; use at most {len(layers)}")
    sizes = pp.stage_split if isinstance(pp.stage_split, list) else split_stages(
        _layer_costs(model, layers, pp.stage_split, sample), num_stages)
    if len(sizes) != num_stages or sum(sizes) != len(layers):
        raise DistmlError(f"stage_split={sizes} must give {num_stages} stages "
                          f"covering the model's {len(layers)} layers")
    starts = [sum(sizes[:i]) for i in range(num_stages + 1)]
    stage_of_layer = [k for k in range(num_stages) for _ in range(sizes[k])]
    stage_of = {path: stage_of_layer[i] for i, (_, paths) in enumerate(layers) for path in paths}
    tied, aliases = _tie_groups(model, stage_of, mesh, ranks, pp_rank, my_stages)
    return StagePlan(ranks, pp_rank, axis.get_group(), num_stages, my_stages,
                     [(starts[i], starts[i + 1]) for i in my_stages], stage_of, tied, aliases)


def _tie_groups(model: nn.Module, stage_of: dict[str, int], mesh: Any, ranks: int,
                pp_rank: int, my_stages: list[int]
                ) -> tuple[list[tuple[nn.Parameter, Any, bool]], dict[str, str]]:
    """Parameters shared by layers on different ranks (a head tied to the embedding):
    (parameter, the group of ranks holding it, whether this rank counts it in the norm), and
    this rank's names of tied parameters -> their canonical names. Every rank creates every
    group, in the same order, as torch requires."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    tied, aliases = [], {}
    for key, ns in names.items():
        stage = {n: stage_of[_owner(n, stage_of)] for n in ns}
        holders = sorted({st % ranks for st in stage.values()})
        local = next((n for n in ns if stage[n] in my_stages), None)
        if local is not None and local != ns[0]:
            aliases[local] = ns[0]
        if len(holders) < 2:
            continue
        grid = rank_grid(mesh)
        me = (mesh["data"].get_local_rank(), local_rank(mesh, "tensor"))
        for d in range(grid.shape[0]):
            for t in range(grid.shape[2]):  # one group per data replica and tensor rank
                group = dist.new_group([int(grid[d, r, t]) for r in holders])
                if local is not None and (d, t) == me:
                    tied.append((params[key], group, pp_rank == holders[0]))
    return tied, aliases


def rank_grid(mesh: Any) -> torch.Tensor:
    """The mesh's global ranks as (data, pipeline, tensor): tensor is 1 on a 2-D mesh."""
    return mesh.mesh.reshape(mesh["data"].size(), mesh["pipeline"].size(), -1)


def local_rank(mesh: Any, axis: str) -> int:
    return mesh[axis].get_local_rank() if axis in mesh.mesh_dim_names else 0


def axis_size(mesh: Any, axis: str) -> int:
    return mesh[axis].size() if axis in mesh.mesh_dim_names else 1


class PipelineParallel(Strategy):
    """Stages on the pipeline ranks: one each under gpipe and 1f1b; under interleaved-1f1b
    ``virtual_stages`` each, dealt round-robin (rank r holds stages r, r + K, ...), which
    shortens the bubble by that factor at the cost of more sends."""

    name = "pipeline"
    needs_full_batches = True  # stages exchange fixed-shape micro-batches

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Plan the stages (the one place the pipeline's layout is decided) and keep this
        rank's stages' layers; the others become empty placeholders."""
        self.plan = plan_stages(model, self.mesh, self.settings.parallel.pipeline, self.sample)
        for path, stage in self.plan.stage_of.items():
            if stage not in self.plan.my_stages:
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent), name, nn.Identity())
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The stages and their schedule, built after activation checkpointing has wrapped
        the blocks (the layers are looked up again, so the stages call the wrapped ones)."""
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        plan, pp = self.plan, self.settings.parallel.pipeline
        layers = pipeline_layers(model)
        self.stage_modules = {i: _Stage(model, layers[lo:hi])
                              for i, (lo, hi) in zip(plan.my_stages, plan.layer_ranges,
                                                     strict=True)}
        stages = [PipelineStage(m, i, plan.num_stages, self.env.device, group=plan.group)
                  for i, m in self.stage_modules.items()]
        # The last step's compute on this rank, for measuring the bubble: (kind, stage,
        # micro-batch, start, end), kind forward / loss / backward / backward_weight, times
        # from time.perf_counter (CLOCK_MONOTONIC on Linux: one clock for every process of
        # the machine, so the ranks' records can be laid on one time line); and the step's
        # (start, end) around the schedule.
        self.actions: list[tuple[str, int, int, float, float]] = []
        self.last_step = (0.0, 0.0)
        for stage in stages:
            for kind, action in (("forward", "forward_one_chunk"),
                                 ("backward", "backward_one_chunk"),
                                 ("backward_weight", "backward_weight_one_chunk")):
                if hasattr(stage, action):
                    setattr(stage, action, self._timed(kind, stage.stage_index,
                                                       getattr(stage, action)))
        self._loss_fn: LossFn | None = None  # the step's loss, set by train_step
        timed_loss = self._timed("loss", plan.num_stages - 1, lambda out, y: self._loss_fn(out, y))
        kw = {"n_microbatches": pp.num_microbatches, "loss_fn": timed_loss}
        if pp.schedule == "interleaved-1f1b":
            self.schedule = ScheduleInterleaved1F1B(stages, **kw)
        else:
            schedule = ScheduleGPipe if pp.schedule == "gpipe" else Schedule1F1B
            self.schedule = schedule(stages[0], **kw)
        return model

    def _timed(self, kind: str, stage: int, fn: Callable) -> Callable:
        """``fn``, recording each call in ``self.actions``. The micro-batch is the chunk id
        the schedule passes first; the loss, called with none, is counted per step (the
        last stage computes it for the micro-batches in order)."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            mb = args[0] if kind != "loss" else sum(a[0] == "loss" for a in self.actions)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.actions.append((kind, stage, int(mb), start, time.perf_counter()))
        return timed

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> float:
        (x, y), = micro_batches  # grad_accum_steps is 1: micro-batching is the schedule's
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss_fn = loss_fn
        x, y = x.to(self.env.device), y.to(self.env.device)
        first, last = 0 in self.plan.my_stages, self.plan.num_stages - 1 in self.plan.my_stages
        losses: list[torch.Tensor] = []
        self.actions.clear()
        start = time.perf_counter()
        with self.autocast():
            self.schedule.step(*([x] if first else []), target=y if last else None,
                               losses=losses if last else None)
        self.last_step = (start, time.perf_counter())  # with self.actions: the bubble
        for p, group, _ in self.plan.tied:  # each stage saw half the story: add them up
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        if self.mesh["data"].size() > 1:
            _average(self.model, self.mesh["data"].get_group())
        self.step_optimizer()
        local = torch.stack(losses).detach().float().mean() if last else torch.zeros(())
        total = local.to(self.env.device, torch.float64)
        dist.all_reduce(total)  # each replica's last stage (each of its tensor ranks) has it
        return float(total) / (self.env.world_size // self.plan.ranks)

    def clip_gradients(self, max_norm: float) -> None:
        # A piece of a stage's parameter is held by each data replica and, unless it is
        # split, by each tensor rank of the stage (3d).
        data, tensor = self.mesh["data"].size(), axis_size(self.mesh, "tensor")
        copies = {id(p) for p, _, counted in self.plan.tied if not counted}  # counted once
        global_norm_clip([p for p in self.model.parameters() if id(p) not in copies],
                         max_norm, lambda p: data * _replication(p, tensor),
                         also=[p for p, _, counted in self.plan.tied if not counted])

    # -- evaluation and state ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """As the base, with a tied parameter's optimizer state under the model's own first
        name for it (the last stage knows the head's weight as 'head.weight', one process
        as 'tok_emb.weight'), so checkpoints move between pipeline and other strategies."""
        state = super().state_dict()
        state["optim"] = _rename_optim(state["optim"], self.plan.aliases)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        back = {v: k for k, v in self.plan.aliases.items()}
        super().load_state_dict({**state, "optim": _rename_optim(state["optim"], back)})

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor | None:
        """The model's output for ``x`` on the last stage's rank (None elsewhere):
        activations go stage to stage by point-to-point sends, a chunk at a time."""
        self.model.eval()
        last = self.plan.num_stages - 1
        outs = []
        for part in x.split(chunk):
            h = part.to(self.env.device)
            for i, module in self.stage_modules.items():
                if i > 0:
                    h = _recv(self._peer(i - 1), self.env.device)
                with self.autocast():
                    h = module(h).float()
                if i < last:
                    _send(h, self._peer(i + 1))
            if last in self.stage_modules:
                outs.append(h.cpu())
        return torch.cat(outs) if outs else None

    def _peer(self, stage: int) -> int:
        return dist.get_global_rank(self.plan.group, stage % self.plan.ranks)

    def evaluate(self, task: str, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[dict[str, float], Any]:
        from distml.tasks import metrics_from_outputs

        out = self.forward_all(x)
        result = [metrics_from_outputs(task, out, y) if out is not None else None]
        last = int(rank_grid(self.mesh)[0, -1, 0])  # replica 0's last stage (tensor rank 0)
        dist.broadcast_object_list(result, src=last)
        return result[0]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Each stage's parameters from replica 0 (whole: 3d's tensor ranks gather theirs),
        put together on rank 0."""
        mine: dict[str, torch.Tensor] = {}
        if self.mesh["data"].get_local_rank() == 0:
            for k, v in get_model_state_dict(self.model).items():
                v = v.full_tensor() if isinstance(v, DTensor) else v  # tensor ranks all call
                mine[k] = v.detach().cpu()
        parts = gather_objects(mine if local_rank(self.mesh, "tensor") == 0 else {},
                               self.env)
        if not self.env.is_main:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            full.update(part)
        return full


def _rename_optim(optim: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """An optimizer state dict (keyed by parameter names) with some names changed."""
    if not names:
        return optim
    return {"state": {names.get(k, k): v for k, v in optim["state"].items()},
            "param_groups": [{**g, "params": [names.get(p, p) for p in g["params"]]}
                             for g in optim["param_groups"]]}


def _owner(param: str, paths: dict[str, int]) -> str:
    for path in paths:
        if param.startswith(path + "."):
            return path
    raise DistmlError(f"strategy pipeline: parameter {param!r} belongs to no layer of "
                      "pipeline_layers(); every parameter must be in one")


def _average(model: nn.Module, group: Any) -> None:
    """Average every gradient over the data-parallel replicas, in one flat all-reduce (of
    this rank's pieces, for 3d's tensor-parallel parameters)."""
    grads = [getattr(p.grad, "_local_tensor", p.grad) for p in model.parameters()
             if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _send(t: torch.Tensor, dst: int) -> None:
    header = torch.tensor([t.dim(), *t.shape], dtype=torch.int64, device=t.device)
    size = torch.tensor([header.numel()], dtype=torch.int64, device=t.device)
    dist.send(size, dst)
    dist.send(header, dst)
    dist.send(t.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    header = torch.zeros(int(size), dtype=torch.int64, device=device)
    dist.recv(header, src)
    t = torch.empty(header[1:].tolist(), dtype=torch.float32, device=device)
    dist.recv(t, src)
    return t
