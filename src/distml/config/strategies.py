"""The strategy table: one record per strategy, from which every list, check and help text
about strategies derives (the config's accepted values and its "applies only to" checks,
``distributed``'s implementations, ``distml verify``'s variants, the CLI's help).

Pure data, without torch: the config validates against it when it loads, and
``distml.distributed.strategy`` resolves the import paths. A new strategy is its module plus
one record here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SYNC_TRAINER = "distml.training.trainer:Trainer"


@dataclass(frozen=True)
class StrategyRecord:
    """What distml knows about a strategy outside its implementation."""

    name: str
    implementation: str  # "module:Class", resolved like a user's module:Class
    summary: str  # what it does, in the strategy field's help
    trainer: str = SYNC_TRAINER  # the training loop that drives it ("module:Class")
    # The parallel settings it reads; given for another strategy, they are refused.
    reads: tuple[str, ...] = ()
    # The mesh axes its model is split over, outermost first ("tensor"; "pipeline", "tensor");
    # each has a degree (tensor_degree, pipeline.degree) and follows the "data" axis.
    model_axes: tuple[str, ...] = ()
    servers: bool = False  # ranks are servers and workers talking point to point, no mesh
    distributed: bool = True  # False: one process only
    fp16: bool = False  # fp16 loss scaling works (gradients are not sharded)
    student: bool = True  # can train a distilled student (takes the student's loss)
    # distml verify: variant name -> parallel settings laid over {"strategy": name}; and,
    # per section, the candidate's own settings a variant keeps (those that do not define it).
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    verify_keeps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Determinism: the variants no run reproduces, so verify refuses them, and why.
    nondeterministic: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_axis(self) -> str | None:
        """The innermost model axis (its ranks are neighbours), None for data parallelism."""
        return self.model_axes[-1] if self.model_axes else None


_DDP = "distml.distributed.data_parallel"
_MP = "distml.distributed.model_parallel"

STRATEGIES: dict[str, StrategyRecord] = {r.name: r for r in [
    StrategyRecord(
        "single", "distml.distributed.strategy:Strategy", "one process",
        distributed=False, fp16=True, variants={"single": {}}),
    StrategyRecord(
        "ddp", f"{_DDP}:DDP", "replicas, gradients all-reduced", fp16=True,
        variants={"ddp": {}}),
    StrategyRecord(
        "zero1", f"{_DDP}:ZeRO1", "ddp with the optimizer state sharded", fp16=True,
        variants={"zero1": {}}),
    StrategyRecord(
        "fsdp", f"{_DDP}:FSDP",
        "parameters, gradients and optimizer state sharded: torch's fully_shard",
        reads=("fsdp",), verify_keeps={"fsdp": ("offload",)},
        variants={"fsdp": {}, "fsdp-zero2": {"fsdp": {"reshard_after_forward": False}}}),
    StrategyRecord(
        "tensor", f"{_MP}:TensorParallel",
        "matrix multiplications split across ranks, fsdp over data_degree replicas",
        reads=("tensor_degree", "data_degree"), model_axes=("tensor",),
        variants={"tensor": {}, "data-x-tensor": {"data_degree": 2}}),
    StrategyRecord(
        "pipeline", f"{_MP}:PipelineParallel",
        "layers split into stages fed with micro-batches, gradients averaged over "
        "data_degree replicas",
        reads=("data_degree", "pipeline"), model_axes=("pipeline",),
        verify_keeps={"pipeline": ("schedule", "num_microbatches", "virtual_stages",
                                   "stage_split")},
        variants={"pipeline": {}, "pipeline-gpipe": {"pipeline": {"schedule": "gpipe"}},
                  "pipeline-1f1b": {"pipeline": {"schedule": "1f1b"}},
                  "pipeline-interleaved": {"pipeline": {"schedule": "interleaved-1f1b"}},
                  "data-x-pipeline": {"data_degree": 2}}),
    StrategyRecord(
        "3d", "distml.distributed.mesh3d:ThreeD",
        "data x pipeline x tensor on one 3-D mesh: pipeline stages (pipeline.degree, "
        "pipeline.* settings) whose layers are split tensor_degree ways, replicated over "
        "data_degree groups whose gradients are all-reduced",
        reads=("data_degree", "tensor_degree", "pipeline"), model_axes=("pipeline", "tensor"),
        verify_keeps={"pipeline": ("schedule", "num_microbatches", "virtual_stages",
                                   "stage_split")},
        # 2 x 2 x 2 on verify's world size 8 (pipeline.degree: the rest).
        variants={"3d": {"data_degree": 2, "tensor_degree": 2}}),
    StrategyRecord(
        "parameter_server", "distml.distributed.param_server.strategy:ParameterServer",
        "servers hold the parameters and apply the optimizer, workers push gradients, "
        "asynchronously or not: see parameter_server",
        trainer="distml.training.ps_trainer:PSTrainer", reads=("parameter_server",),
        servers=True, student=False,
        # One worker, the other ranks servers: each step is the one process's step.
        variants={"ps-sync": {"parameter_server": {"mode": "sync"}}},
        nondeterministic={
            "ps-async": "gradients are applied in the order they arrive, with a staleness "
                        "that depends on timing",
            "ps-ssp": "within the staleness bound, gradients are applied in the order they "
                      "arrive",
            "ps-sync-backup": "which gradients a step drops depends on which arrive last"}),
]}

# verify's variants by name: the parallel settings each sets, its strategy's included.
VARIANTS: dict[str, dict[str, Any]] = {
    name: {"strategy": r.name, **settings}
    for r in STRATEGIES.values() for name, settings in r.variants.items()}
NONDETERMINISTIC: dict[str, str] = {
    name: why for r in STRATEGIES.values() for name, why in r.nondeterministic.items()}


# Each setting that some strategies read only -> those strategies; set for another, it is
# refused, and a candidate inherits the shared value only if its strategy reads it.
OWNERS: dict[str, tuple[str, ...]] = {
    key: tuple(r.name for r in STRATEGIES.values() if key in r.reads)
    for key in dict.fromkeys(k for r in STRATEGIES.values() for k in r.reads)}


def listed(where: Callable[[StrategyRecord], bool]) -> str:
    """The strategies whose record satisfies ``where``, for a message: "a, b or c"."""
    found = [r.name for r in STRATEGIES.values() if where(r)]
    return " or ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found)


def variant_names() -> str:
    """What ``distml verify --strategies`` takes, for its help and its errors."""
    return f"{', '.join(VARIANTS)} or module:Class"


def described() -> str:
    """The strategy field's help: each strategy and what it does."""
    return "; ".join(f"{r.name} ({r.summary})" for r in STRATEGIES.values()) + "."
