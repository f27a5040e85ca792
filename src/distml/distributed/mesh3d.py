"""3-D parallelism: data x pipeline x tensor on one device mesh ("data", "pipeline",
"tensor"; the tensor axis innermost, so the ranks that all-reduce inside every block are
neighbours, and the pipeline's point-to-point sends go between them).

- The model's layers are cut into pipeline stages exactly as ``strategy: pipeline`` cuts them
  (``pipeline_layers()``, stage_split, schedule, micro-batches: the ``pipeline`` settings).
- Within a stage, the layers it keeps are split across the stage's tensor ranks by the
  model's own ``tensor_plan()`` (the entries of other stages' layers are dropped): a stage's
  activations leave it whole (RowwiseParallel all-reduces), so the stages exchange the same
  plain tensors as a pipeline does, each tensor rank with its peer of the same tensor rank.
- Over the data axis, each (pipeline, tensor) position is replicated ``data_degree`` times;
  after the schedule's step, gradients are averaged over the replicas by one flat
  all-reduce of this rank's pieces (DDP-style, as data x pipeline does). Not FSDP: sharding
  the parameters over the data axis would re-gather them for every micro-batch of the
  schedule, and the replicas here are as small as a stage's tensor shard already is.

Parameter names stay canonical (the pipeline's empty placeholders, DTensor shards under the
model's own names), so torch.distributed.checkpoint reshards a 3-D checkpoint into any other
strategy and back, and ``full_state_dict`` gathers a normal model for export.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from distml.distributed.model_parallel import PipelineParallel, tensor_plan


class ThreeD(PipelineParallel):
    """Pipeline stages whose layers are tensor-parallel, replicated over the data axis.
    Apply order: cut the stages, split their layers (tensor parallel), activation
    checkpointing, then the stages and their schedule (``PipelineParallel.wrap``)."""

    name = "3d"

    def parallelize(self, model: nn.Module) -> nn.Module:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = tensor_plan(model, self.name)
        model = super().parallelize(model)  # this rank's stages kept, the others emptied
        mine = stage_plan_entries(plan, self.plan.stage_of, self.plan.my_stages)
        return parallelize_module(model, self.mesh["tensor"], mine) if mine else model


def stage_plan_entries(plan: dict[str, Any], stage_of: dict[str, int], stages: list[int]
                       ) -> dict[str, Any]:
    """The entries of a tensor plan whose modules lie in ``stages`` (a module path lies in
    the stage of the layer path it is, or is under)."""
    def stage(path: str) -> int | None:
        return next((s for p, s in stage_of.items()
                     if path == p or path.startswith(p + ".")), None)

    return {path: style for path, style in plan.items() if stage(path) in stages}
