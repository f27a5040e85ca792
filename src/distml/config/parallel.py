"""``train.parallel``: how a candidate's training is spread over processes, and
``ParallelDims``, which checks the degrees once and builds the one device mesh.

Each nested section belongs to the strategies that read it (``pipeline`` to pipeline,
``fsdp`` to fsdp, as the strategy table says); setting it for another strategy is an error,
so the structure says what applies where instead of a list of special cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from distml.config.base import Strict
from distml.config.strategies import OWNERS, STRATEGIES, StrategyRecord, described

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

StrategyName = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]


def _only(setting: str) -> str:
    return f"strategy {' or '.join(OWNERS[setting])} only."


class PipelineConfig(Strict):
    """Pipeline parallelism: stages fed with micro-batches."""

    degree: int | None = Field(
        None, description="Stages (pipeline ranks; 3d: per data replica, each stage on "
        "tensor_degree ranks); -1: the rest. Default: the rest of world_size.")
    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b"] = Field(
        "1f1b", description="gpipe (all forwards, then all backwards), 1f1b (one forward, one "
        "backward: fewer activations alive), or interleaved-1f1b (virtual_stages stages per "
        "rank: a smaller bubble, more sends).")
    num_microbatches: int = Field(
        4, ge=1, description="Micro-batches each replica's batch is cut into.")
    virtual_stages: int = Field(
        2, ge=1, description="interleaved-1f1b: stages per rank, dealt round-robin.")
    stage_split: Literal["params", "time"] | list[int] = Field(
        "params", description="Balance stages by parameter count, by measured forward time "
        "(GPipe's heuristic), or give the number of layers per stage.")

    @property
    def stages_per_rank(self) -> int:
        return self.virtual_stages if self.schedule == "interleaved-1f1b" else 1


class FsdpConfig(Strict):
    """Fully sharded data parallelism (torch's fully_shard)."""

    reshard_after_forward: bool = Field(
        True, description="true frees gathered parameters after forward (ZeRO-3); false keeps "
        "them for backward (ZeRO-2 behaviour).")
    offload: bool = Field(
        False, description="Keep parameters, gradients and optimizer state in CPU memory "
        "between uses (torch's CPUOffloadPolicy; needs an accelerator).")


class ParameterServerConfig(Strict):
    """Parameter servers: the first num_servers ranks hold the parameters and apply the
    optimizer; the other ranks are workers that compute gradients on work items."""

    num_servers: int = Field(
        1, ge=1, description="Server ranks (the first ones); the parameters are split across "
        "them in equal byte ranges. The other world_size - num_servers ranks are workers.")
    mode: Literal["async", "ssp", "sync"] = Field(
        "async", description="async (every gradient applied as it arrives); ssp "
        "(stale-synchronous: a worker may run at most `staleness` steps ahead of the "
        "slowest); sync (a step averages one gradient per worker, less backup_workers).")
    staleness: int = Field(
        2, ge=0, description="ssp: the bound s on how many steps the fastest worker may be "
        "ahead of the slowest (Ho et al. 2013).")
    backup_workers: int = Field(
        0, ge=0, description="sync: a step takes the first workers - backup_workers gradients "
        "to arrive and drops the late ones (Chen et al. 2016).")
    batches_per_item: int = Field(
        4, ge=1, description="Size of a work item: this many of a worker's batches (of "
        "batch_size / workers rows), cut from one partition of the training split.")
    worker: str | None = Field(
        None, description="A subclass of distml's parameter-server Worker, as module:Class, "
        "to run the workers as (the tests and the benchmark slow one down with it); null: "
        "distml's own.")
    lease_s: float = Field(
        20.0, gt=0, description="A worker whose heartbeat stops for this long (hung, e.g. "
        "SIGSTOPped) is declared dead: the servers re-queue its item and its keeper kills it.")
    table_optimizer: Literal["adagrad", "adam"] = Field(
        "adagrad", description="A model's sparse embedding tables (distml.models.click:"
        "ClickModel) live on the servers, rows spread over them: the row-wise optimizer "
        "they apply (row-wise Adagrad or lazy Adam, torch's SparseAdam rule).")
    table_lr: float | None = Field(
        None, gt=0, description="The tables' learning rate (following the LR schedule); "
        "null: train.lr.")
    table_partition: Literal["hash", "range"] = Field(
        "hash", description="Which server holds a table row: hash (row id mod servers) or "
        "range (contiguous ranges).")
    table_init_scale: float = Field(
        0.05, gt=0, description="A table row is created when first touched, uniform in "
        "[-scale, scale), a pure function of (the config's seed, table, row id).")

    @model_validator(mode="after")
    def _mode_reads_it(self) -> ParameterServerConfig:
        """A mode given together with a setting of another mode is a mistake. (Given apart,
        e.g. a candidate changing only the mode, the inherited setting is just unused.)"""
        given = self.model_fields_set
        for key, mode in _MODE_OWNERS.items():
            default = type(self).model_fields[key].default
            if {"mode", key} <= given and getattr(self, key) != default and self.mode != mode:
                raise ValueError(f"parallel.parameter_server.{key} applies to mode {mode}, "
                                 f"not {self.mode!r}; remove it or set mode: {mode}")
        return self


class ParallelConfig(Strict):
    """The parallelism strategy and its degrees; a candidate overrides any part of it."""

    strategy: StrategyName = Field("single", description=described())
    world_size: int = Field(1, ge=1, description="Number of training processes.")
    launcher: Literal["torchrun", "spark", "spark-local"] = Field(
        "torchrun", description="What starts the processes: torchrun's agent; spark: "
        "pyspark's TorchDistributor in barrier mode (a Spark task per process); spark-local: "
        "TorchDistributor's local mode (on the Spark driver).")
    num_nodes: int = Field(
        1, ge=1, description="Machines the world_size processes are spread over (torchrun "
        "--nnodes, a Kubernetes TrainJob's numNodes); the local launcher runs them all here.")
    min_nodes: int | None = Field(
        None, ge=1, description="Elastic training (ddp, zero1, fsdp): the fewest machines the "
        "job runs on (torchrun --nnodes MIN:MAX); with max_nodes, nodes may leave and join "
        "mid-run and the ranks re-form at the new size. null: not elastic.")
    max_nodes: int | None = Field(
        None, ge=1, description="Elastic training: the most machines the job runs on; each "
        "runs world_size / num_nodes processes. null: not elastic.")
    data_degree: int | None = Field(
        None, description="tensor/pipeline/3d: data-parallel replicas; -1: what the other "
        "degrees leave. Default: 1, or the rest when tensor_degree/pipeline.degree is set "
        "(3d: give all but one of data_degree, tensor_degree, pipeline.degree).")
    tensor_degree: int | None = Field(
        None, description="tensor/3d: ranks that split each layer; -1: the rest. Default: "
        "the rest of world_size.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig,
                                     description=_only("pipeline"))
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig, description=_only("fsdp"))
    parameter_server: ParameterServerConfig = Field(
        default_factory=ParameterServerConfig, description=_only("parameter_server"))

    def check_applies(self, strategy: str | None = None) -> None:
        """A setting given for a strategy that does not read it is a mistake: say so.
        ``strategy``: the one in force, when this is a candidate's partial override."""
        strategy = strategy or self.strategy
        for key, owners in OWNERS.items():
            default = type(self).model_fields[key].get_default(call_default_factory=True)
            if getattr(self, key) != default and strategy not in owners:
                raise ValueError(
                    f"parallel.{key} applies to strategy {' or '.join(owners)}, not "
                    f"{strategy!r}; remove it or change the strategy")

    @property
    def record(self) -> StrategyRecord:
        """The strategy's record in the strategy table."""
        return STRATEGIES[self.strategy]

    @property
    def procs_per_node(self) -> int:
        return self.world_size // self.num_nodes

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None or self.max_nodes is not None

    @property
    def node_range(self) -> tuple[int, int]:
        """(fewest, most) machines: both num_nodes unless elastic."""
        if not self.elastic:
            return self.num_nodes, self.num_nodes
        return self.min_nodes or 1, self.max_nodes or self.num_nodes

    @property
    def world_sizes(self) -> list[int]:
        """Every world size the job may run at."""
        lo, hi = self.node_range
        return [n * self.procs_per_node for n in range(lo, hi + 1)]


def applicable(parallel: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Parallel settings (as data) without the sections that ``strategy`` does not read:
    a candidate inherits the shared pipeline settings only if it is a pipeline itself, and a
    parameter-server candidate its mode's settings only."""
    out = {k: v for k, v in parallel.items() if strategy in OWNERS.get(k, (strategy,))}
    ps = out.get("parameter_server")
    if isinstance(ps, dict) and "mode" in ps:
        out["parameter_server"] = {k: v for k, v in ps.items()
                                   if _MODE_OWNERS.get(k, ps["mode"]) == ps["mode"]}
    return out


_MODE_OWNERS = {"staleness": "ssp", "backup_workers": "sync"}


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of each mesh axis, validated once; their product is the world size.
    Under parameter_server, ``data`` counts the workers and ``servers`` the servers: roles
    that talk point to point, not axes of a mesh."""

    strategy: str
    world_size: int
    data: int
    tensor: int = 1
    pipeline: int = 1
    servers: int = 0

    @classmethod
    def from_config(cls, p: ParallelConfig) -> ParallelDims:
        record = p.record
        if record.servers:
            servers = p.parameter_server.num_servers
            if servers >= p.world_size:
                raise ValueError(
                    f"parallel.parameter_server.num_servers={servers} leaves no worker in "
                    f"world_size={p.world_size}; use at most {p.world_size - 1} servers or a "
                    "larger world_size")
            return cls(p.strategy, p.world_size, p.world_size - servers, servers=servers)
        if not record.model_axes:  # data parallel only (or one process)
            return cls(p.strategy, p.world_size, p.world_size)
        keys = ["data_degree", *(DEGREE_KEYS[a] for a in record.model_axes)]
        given = [p.data_degree, *(_degree(p, a) for a in record.model_axes)]
        model = [-1 if d is None else d for d in given[1:]]
        data = given[0] if given[0] is not None else 1 if all(
            d is None for d in given[1:]) else -1
        degrees = [data, *model]
        if degrees.count(-1) > 1:
            rest = [k for k, d in zip(keys, degrees, strict=True) if d == -1]
            raise ValueError(f"only one of {' and '.join(rest)} may be -1 ('the rest')"
                             if len(keys) == 2 else
                             f"strategy {p.strategy}: {' and '.join(rest)} are both left to "
                             "'the rest'; give all but one of " + ", ".join(keys))
        known = math.prod(d for d in degrees if d != -1)
        rest = p.world_size // known if p.world_size % known == 0 else 0
        degrees = [rest if d == -1 else d for d in degrees]
        if min(degrees) < 1 or math.prod(degrees) != p.world_size:
            raise ValueError(
                f"{' x '.join(keys)} = {' x '.join(_shown(d) for d in given)} does not "
                f"multiply to world_size={p.world_size}; choose degrees whose product is "
                f"{p.world_size} (one may be -1)")
        return cls(p.strategy, p.world_size, degrees[0],
                   **dict(zip(record.model_axes, degrees[1:], strict=True)))

    @property
    def model_axis(self) -> str | None:
        """The mesh axis the model is split over, innermost (its ranks are neighbours)."""
        return "tensor" if self.tensor > 1 else "pipeline" if self.pipeline > 1 else \
            STRATEGIES[self.strategy].model_axis

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The one device mesh: ("data",), ("data", model axis) or, for 3d, ("data",
        "pipeline", "tensor"); None for parameter servers, whose ranks exchange tensors point
        to point."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.servers:
            return None
        axes = STRATEGIES[self.strategy].model_axes
        if len(axes) > 1:  # ("data", "pipeline", "tensor"): tensor ranks are neighbours
            return init_device_mesh(device_type, (self.data, *(getattr(self, a) for a in axes)),
                                    mesh_dim_names=("data", *axes))
        axis = self.model_axis
        if axis is None:
            return init_device_mesh(device_type, (self.data,), mesh_dim_names=("data",))
        return init_device_mesh(device_type, (self.data, self.tensor * self.pipeline),
                                mesh_dim_names=("data", axis))


# Each model axis's degree in train.parallel (a record's model_axes name the axes).
DEGREE_KEYS = {"tensor": "tensor_degree", "pipeline": "pipeline.degree"}


def _degree(p: ParallelConfig, axis: str) -> int | None:
    return p.tensor_degree if axis == "tensor" else p.pipeline.degree


def _shown(degree: int | None) -> str:
    return "the rest" if degree in (None, -1) else str(degree)
