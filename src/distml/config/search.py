"""A candidate's ``search`` section: the space over its own training and model keys, and how
Optuna explores it (sampler, pruner, budget, storage). Data only: ``distml.search`` runs it.

A space value is one of ``{uniform: [a, b]}``, ``{loguniform: [a, b]}``,
``{int: [a, b], step: 1, log: false}`` or ``{choice: [v, ...]}``; its key is a candidate key,
dotted for nested ones (``lr``, ``batch_size``, ``model.hidden_sizes``, ``model.dropout``).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from distml.config.base import Strict

SAMPLERS = ("tpe", "random", "grid", "qmc", "gp")
PRUNERS = ("none", "median", "successive_halving", "asha", "hyperband")


class UniformSpace(Strict):
    """A float drawn uniformly from [a, b]."""

    uniform: tuple[float, float] = Field(description="[low, high] of a float.")

    def bounds(self) -> list[Any]:
        return list(self.uniform)


class LogUniformSpace(Strict):
    """A positive float drawn uniformly on a log scale from [a, b] (learning rates)."""

    loguniform: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        description="[low, high] of a positive float, sampled in log space.")

    def bounds(self) -> list[Any]:
        return list(self.loguniform)


class IntSpace(Strict):
    """An integer from [a, b] (both included), every ``step``-th, optionally log-scaled."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    int_: tuple[int, int] = Field(alias="int", description="[low, high] of an integer.")
    step: int = Field(1, ge=1, description="Spacing of the integers drawn.")
    log: bool = Field(False, description="Sample in log space (needs step 1 and low >= 1).")

    def bounds(self) -> list[Any]:
        return list(self.int_)

    @model_validator(mode="after")
    def _log_needs_step_one(self) -> IntSpace:
        if self.log and (self.step != 1 or self.int_[0] < 1):
            raise ValueError(f"int {list(self.int_)} with log: true needs step 1 and a low "
                             "bound of at least 1")
        return self


class ChoiceSpace(Strict):
    """One of the values listed (any YAML value: numbers, strings, lists such as layer
    sizes); ``sampler: grid`` tries every combination of the choices."""

    choice: list[Any] = Field(min_length=1, description="The values to choose from.")

    def bounds(self) -> list[Any]:
        return list(self.choice)


def _kind(value: Any) -> str | None:
    for cls, tag in _TAGS.items():  # a validated value (when it is dumped)
        if isinstance(value, cls):
            return tag
    if isinstance(value, dict):
        for key in ("uniform", "loguniform", "int", "choice"):
            if key in value:
                return key
    return None


_TAGS = {UniformSpace: "uniform", LogUniformSpace: "loguniform", IntSpace: "int",
         ChoiceSpace: "choice"}

SpaceValue = Annotated[
    Annotated[UniformSpace, Tag("uniform")] | Annotated[LogUniformSpace, Tag("loguniform")]
    | Annotated[IntSpace, Tag("int")] | Annotated[ChoiceSpace, Tag("choice")],
    Discriminator(_kind, custom_error_type="space_value", custom_error_message=(
        "a space value is {uniform: [a, b]}, {loguniform: [a, b]}, {int: [a, b]} (with "
        "optional step and log) or {choice: [v, ...]}")),
]


class SearchConfig(Strict):
    """Search over the candidate's own keys: every trial is a candidate run whose config is
    the candidate with the sampled values; the best trial stands for the candidate in
    selection."""

    space: dict[str, SpaceValue] = Field(
        min_length=1, description="Candidate key (dotted for nested keys: model.dropout) -> "
        "{uniform: [a, b]}, {loguniform: [a, b]}, {int: [a, b], step, log} or "
        "{choice: [...]}.")
    num_trials: int = Field(10, ge=1, description="Trials to finish (completed, pruned or "
                            "failed); sampler grid stops at the grid's size.")
    timeout_s: float | None = Field(None, gt=0, description="Start no trial after this many "
                                    "seconds of searching; null: no time budget.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials running at once, each a work item on the executor "
        "(execution.executor); default: execution.num_workers or the CPU count.")
    seed: int | None = Field(None, description="Seed of the sampler; default: the config's "
                             "seed.")
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        "tpe", description="Optuna sampler: tpe, random, grid (every space value a choice), "
        "qmc (quasi-random) or gp (Gaussian process).")
    pruner: Literal[PRUNERS] = Field(  # type: ignore[valid-type]
        "median", description="Optuna pruner fed the validation metric at every evaluation "
        "(each epoch, or every eval_every_steps): none, median, successive_halving, asha (the "
        "same, asynchronous) or hyperband.")
    storage: str | None = Field(
        None, description="Optuna storage (any SQLAlchemy URL, e.g. "
        "postgresql://user@host/db); default: sqlite:///<run>/search/<candidate>.db. "
        "distml run --resume goes on with its finished trials.")

    @field_validator("space")
    @classmethod
    def _dotted_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"space key {key!r} is not a dotted candidate key (lr, "
                                 "model.hidden_sizes)")
            if key.split(".")[0] in ("name", "search", "distill"):
                raise ValueError(f"space key {key!r}: the candidate's {key.split('.')[0]} "
                                 "cannot be searched; search training keys (lr, batch_size) "
                                 "or model keys (model.hidden_sizes)")
        return value

    @model_validator(mode="after")
    def _grid_of_choices(self) -> SearchConfig:
        if self.sampler == "grid":
            ranges = [k for k, v in self.space.items() if not isinstance(v, ChoiceSpace)]
            if ranges:
                raise ValueError(f"sampler grid needs every space value to be a choice; "
                                 f"{', '.join(ranges)} are ranges: list their values with "
                                 "{choice: [...]}, or use sampler tpe or random")
        return self


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``key`` set to ``value`` (sections made as
    needed)."""
    out = copy.deepcopy(data)
    node = out
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = copy.deepcopy(value)
    return out
