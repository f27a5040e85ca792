"""The ``train`` section: settings shared by every candidate, and the candidates, each of
which may override any setting (nested sections are deep-merged)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, model_validator

from distml.config.base import NAME_PATTERN, Strict
from distml.config.distill import DistillConfig, training_order
from distml.config.models import ModelSpec
from distml.config.parallel import ParallelConfig, ParallelDims, applicable
from distml.config.search import SearchConfig, set_dotted
from distml.config.strategies import listed
from distml.errors import ConfigError

ELASTIC = ("ddp", "zero1", "fsdp")  # strategies whose ranks re-form at another world size


class TrainSettings(Strict):
    """Training settings shared by every candidate; a candidate may override any of them."""

    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Samples per optimizer step (global batch).")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum (sgd only).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "cosine", description="Decay after warmup: constant, cosine or linear."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null: off.")
    grad_accum_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; batch_size is split among them."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32; bf16 autocast; or fp16 autocast with dynamic loss scaling.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward instead of keeping "
        "them (less memory, about one more forward of compute).")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate on val every N steps; null: at the end of each epoch."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without improvement."
    )
    restore_best: bool = Field(True, description="End with the best weights seen on val.")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps; null: at the end of each epoch."
    )
    checkpoints: bool = Field(True, description="Write checkpoints (for --resume and restarts).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    max_restarts: int = Field(
        0, ge=0, description="Restart every process this many times after one dies; training "
        "continues from the last checkpoint (needs checkpoints)."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig, description="Parallelism: strategy, world size, "
        "degrees, and the pipeline and fsdp settings.")

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims.from_config(self.parallel)

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        p, record = self.parallel, self.parallel.record
        dims = self.dims
        if p.world_size % p.num_nodes:
            raise ValueError(f"parallel.world_size={p.world_size} does not divide over "
                             f"num_nodes={p.num_nodes}; use a multiple of {p.num_nodes}")
        if p.world_size > self.batch_size:
            raise ValueError(
                f"parallel.world_size={p.world_size} is larger than the global batch_size="
                f"{self.batch_size}: every rank needs samples in every step; use a batch size "
                f"of at least {p.world_size}")
        if not record.distributed and p.world_size > 1:
            raise ValueError(
                f"parallel.world_size={p.world_size} needs a distributed strategy; strategy "
                f"{p.strategy!r} runs one process (use ddp, zero1 or fsdp, or world_size: 1)")
        per_step = dims.data * self.grad_accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by data-parallel ranks x "
                f"grad_accum_steps={dims.data} x {self.grad_accum_steps}={per_step}; "
                "use a batch size that is a multiple of it")
        if p.elastic:
            self._check_elastic()
        if "pipeline" in record.reads:
            self._check_pipeline(dims)
        if "parameter_server" in record.reads:
            self._check_parameter_server(dims)
        if self.precision == "fp16" and not record.fp16:
            raise ValueError(
                f"precision fp16 with strategy {p.strategy!r}: its loss scaler would skip "
                "steps on some ranks and not others when gradients are sharded; use bf16 "
                f"(no loss scaling needed) or strategy {listed(lambda r: r.fp16)}")
        if self.max_restarts and not self.checkpoints:
            raise ValueError(
                f"max_restarts={self.max_restarts} needs checkpoints to restart from; set "
                "checkpoints: true (or max_restarts: 0)")
        return self

    def _check_elastic(self) -> None:
        """An elastic job keeps its global batch at every size it may run at."""
        p = self.parallel
        lo, hi = p.node_range
        if p.strategy not in ELASTIC:
            raise ValueError(f"parallel.min_nodes/max_nodes (elastic training) with strategy "
                             f"{p.strategy!r}: use {', '.join(ELASTIC)}, or remove them")
        if not lo <= hi:
            raise ValueError(f"parallel.min_nodes={lo} is more than max_nodes={hi}; give "
                             "min_nodes <= max_nodes")
        if not self.checkpoints:
            raise ValueError("elastic training (parallel.min_nodes/max_nodes) resumes from "
                             "checkpoints at every membership change; set checkpoints: true")
        for world in p.world_sizes:
            if self.batch_size % (world * self.grad_accum_steps):
                raise ValueError(
                    f"batch_size={self.batch_size} is the global batch at every size of an "
                    f"elastic job, but {world} ranks x grad_accum_steps="
                    f"{self.grad_accum_steps} do not divide it; use a multiple of "
                    f"{math.lcm(*p.world_sizes) * self.grad_accum_steps}")

    def _check_pipeline(self, dims: ParallelDims) -> None:
        pp = self.parallel.pipeline
        if self.grad_accum_steps > 1:
            raise ValueError("pipeline accumulates over parallel.pipeline.num_microbatches; set "
                             "grad_accum_steps: 1 and raise num_microbatches instead")
        if pp.schedule == "interleaved-1f1b" and pp.num_microbatches % dims.pipeline:
            raise ValueError(
                f"interleaved-1f1b runs num_microbatches={pp.num_microbatches} in rounds of "
                f"pipeline degree={dims.pipeline}; use a multiple of it")
        if (self.batch_size // dims.data) % pp.num_microbatches:
            raise ValueError(
                f"batch_size={self.batch_size} over {dims.data} replica(s) gives "
                f"{self.batch_size // dims.data} samples per pipeline, which do not divide "
                f"into num_microbatches={pp.num_microbatches}; use a batch size that is a "
                f"multiple of {dims.data * pp.num_microbatches}")

    def _check_parameter_server(self, dims: ParallelDims) -> None:
        ps = self.parallel.parameter_server
        if ps.backup_workers >= dims.data:
            raise ValueError(
                f"parallel.parameter_server.backup_workers={ps.backup_workers} must be less "
                f"than the {dims.data} worker(s) (world_size - num_servers): a step needs at "
                f"least one gradient; use at most {dims.data - 1}")
        if self.grad_accum_steps > 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} with strategy "
                             "parameter_server: a worker pushes one batch's gradient at a "
                             "time; set grad_accum_steps: 1 (raise batch_size instead)")
        if self.checkpoint_every_steps is not None:
            raise ValueError(
                f"checkpoint_every_steps={self.checkpoint_every_steps} with strategy "
                "parameter_server: its checkpoints are taken at the end of each epoch, when "
                "no gradient is in flight; remove checkpoint_every_steps")

    def check_model(self, model: Any) -> None:
        """Refuse a model split that cannot work, before any process starts."""
        p, dims = self.parallel, self.dims
        if "tensor" in p.record.model_axes:
            model.check_tensor_degree(dims.tensor, strategy=p.strategy)
        if "pipeline" not in p.record.model_axes:
            return
        stages = dims.pipeline * p.pipeline.stages_per_rank  # the stages to cut the model into
        layers = model.pipeline_layer_count()
        if layers == 0:
            raise ValueError(f"strategy {p.strategy} needs a model that is a sequence of blocks "
                             "(mlp, transformer, an nn.Sequential or a model with "
                             f"pipeline_layers()); the {model.type} is not; use ddp or fsdp")
        if layers is not None and stages > layers:
            raise ValueError(f"{stages} pipeline stages (pipeline degree x virtual_stages "
                             "under interleaved-1f1b) is more than the model's "
                             f"{layers} layers; use at most {layers} stages")
        split = p.pipeline.stage_split
        if isinstance(split, list) and (len(split) != stages or min(split) < 1 or (
                layers is not None and sum(split) != layers)):
            raise ValueError(f"stage_split={split} must give {stages} positive layer counts"
                             + (f" that sum to the model's {layers} layers"
                                if layers is not None else ""))


def _optional(field: Any) -> tuple[Any, Any]:
    """The same field, but optional with default None (for per-candidate overrides)."""
    annotation = field.annotation
    if field.metadata:
        annotation = Annotated[annotation, *field.metadata]
    return (annotation | None, Field(None, description=field.description))


_CandidateBase = create_model(  # type: ignore[call-overload]
    "_CandidateBase",
    __base__=Strict,
    **{name: _optional(f) for name, f in TrainSettings.model_fields.items()},
)


class Candidate(_CandidateBase):  # type: ignore[misc,valid-type]
    """One model to train; any training setting given here overrides the shared one."""

    name: str = Field(pattern=NAME_PATTERN, description="Unique candidate name.")
    model: ModelSpec = Field(description="The model: a zoo type with options, or a user factory.")
    distill: DistillConfig | None = Field(
        None, description="Learn from a teacher's softened outputs as well as the labels "
        "(knowledge distillation); null: from the labels alone.")
    search: SearchConfig | None = Field(
        None, description="Search this candidate's hyperparameters or architecture: trials "
        "in parallel on the executor, sampled and pruned by Optuna; the best trial enters "
        "selection as the candidate. null: train it once as given.")

    def overrides(self) -> dict[str, Any]:
        """What this candidate sets, nested sections holding only the keys it gives."""
        return self.model_dump(exclude_unset=True,
                               exclude={"name", "model", "distill", "search"})

    def with_values(self, values: dict[str, Any], *, name: str | None = None) -> Candidate:
        """This candidate with the dotted keys of ``values`` set (a search trial), named
        ``name``, without its search; ValueError when they make an invalid candidate."""
        data = self.model_dump(mode="json", exclude_unset=True, exclude={"search"})
        data["model"] = self.model.model_dump(mode="json", exclude_unset=True)
        for key, value in values.items():
            data = set_dotted(data, key, value)
        if name is not None:
            data["name"] = name
        try:
            return Candidate.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it; mappings merge key by key, the rest replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class TrainConfig(TrainSettings):
    """Shared training settings plus the candidates to train."""

    candidates: list[Candidate] = Field(min_length=1, description="Models to train and compare.")

    @model_validator(mode="after")
    def _unique_and_consistent(self) -> TrainConfig:
        seen: set[str] = set()
        for c in self.candidates:
            if c.name in seen:
                raise ValueError(f"two candidates are named {c.name!r}; names must be unique")
            seen.add(c.name)
            settings = self.settings_for(c)  # cross-field checks on the merged settings
            try:
                settings.check_model(c.model)
            except ValueError as e:
                raise ValueError(f"candidate {c.name!r}: {e}") from None
            if c.search is not None:
                self._check_search(c, settings)
            if c.distill is not None and not settings.parallel.record.student:
                raise ValueError(
                    f"candidate {c.name!r}: distill with strategy "
                    f"{settings.parallel.strategy!r}: its training loop takes no student's "
                    f"loss; use strategy {listed(lambda r: r.student)} for the student")
        return self

    def _check_search(self, c: Candidate, settings: TrainSettings) -> None:
        """Refuse a search that cannot run, and every bound or choice of its space that
        makes an invalid candidate on its own (combinations are checked per trial)."""
        where = f"candidate {c.name!r}: search"
        if settings.parallel.record.distributed:
            raise ValueError(f"{where} with strategy {settings.parallel.strategy!r}: a trial "
                             "runs on one executor worker; search with strategy single (or "
                             "auto on one device), then train the best with more processes")
        if c.distill is not None:
            raise ValueError(f"{where} of a distilled student: search its teacher, or remove "
                             "the student's distill section")
        for key, space in c.search.space.items():
            for value in space.bounds():
                try:
                    trial = c.with_values({key: value})
                    self.settings_for(trial).check_model(trial.model)
                except ValueError as e:
                    raise ValueError(f"{where}.space.{key}: the value {value!r} makes an "
                                     f"invalid candidate ({e}); change the space") from None

    def training_order(self, only: str | None = None) -> list[Candidate]:
        """Candidates in the order they train: every teacher before its students; with
        ``only``, that candidate and the candidates it learns from."""
        if only is not None:
            self.candidate(only)  # an unknown name fails here
        return training_order(self.candidates, only)

    def settings_for(self, candidate: Candidate) -> TrainSettings:
        """The shared settings with the candidate's overrides deep-merged over them. The
        shared pipeline and fsdp sections are defaults for the candidates whose strategy
        reads them; a candidate's own section must apply to its strategy."""
        merged = deep_merge(self.model_dump(exclude={"candidates"}), candidate.overrides())
        strategy = merged["parallel"]["strategy"]
        try:
            if candidate.parallel is not None:
                candidate.parallel.check_applies(strategy)
            merged["parallel"] = applicable(merged["parallel"], strategy)
            return TrainSettings(**merged)
        except ValidationError as e:
            msg = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"candidate {candidate.name!r}: {msg}") from None
        except ValueError as e:
            raise ValueError(f"candidate {candidate.name!r}: {e}") from None

    def parallel_for(self, candidate: Candidate) -> ParallelConfig:
        """The candidate's parallel settings with every section, including those its own
        strategy does not read (``distml verify`` tries the other strategies with them)."""
        shared = self.parallel.model_dump()
        own = candidate.parallel.model_dump(exclude_unset=True) if candidate.parallel else {}
        return ParallelConfig(**deep_merge(shared, own))

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        names = ", ".join(c.name for c in self.candidates)
        raise ConfigError(f"no candidate named {name!r}; the config has: {names}")
