"""A ``search`` section in Optuna's terms: distributions, sampler, pruner and storage.

Optuna's categorical distribution holds scalars only, so a choice of lists (layer sizes) is
offered to it as the values' JSON text and decoded back when a trial's values are set.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from sqlalchemy.engine import make_url

from distml.config.search import (
    ChoiceSpace,
    IntSpace,
    LogUniformSpace,
    SearchConfig,
    UniformSpace,
)

_SCALAR = (type(None), bool, int, float, str)


def _choices(space: ChoiceSpace) -> tuple[Any, ...]:
    if all(isinstance(v, _SCALAR) for v in space.choice):
        return tuple(space.choice)
    return tuple(json.dumps(v) for v in space.choice)


def distributions(search: SearchConfig) -> dict[str, BaseDistribution]:
    """Space key -> the Optuna distribution it is sampled from."""
    out: dict[str, BaseDistribution] = {}
    for key, space in search.space.items():
        if isinstance(space, UniformSpace):
            out[key] = FloatDistribution(*space.uniform)
        elif isinstance(space, LogUniformSpace):
            out[key] = FloatDistribution(*space.loguniform, log=True)
        elif isinstance(space, IntSpace):
            out[key] = IntDistribution(*space.int_, step=space.step, log=space.log)
        else:
            out[key] = CategoricalDistribution(_choices(space))
    return out


def decode(search: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna params as candidate values (JSON-encoded choices decoded)."""
    out = {}
    for key, value in params.items():
        space = search.space.get(key)
        encoded = isinstance(space, ChoiceSpace) and not all(
            isinstance(v, _SCALAR) for v in space.choice)
        out[key] = json.loads(value) if encoded else value
    return out


def grid_size(search: SearchConfig) -> int | None:
    """How many trials a grid search has (None for the other samplers)."""
    if search.sampler != "grid":
        return None
    return math.prod(len(s.choice) for s in search.space.values())  # type: ignore[union-attr]


def make_sampler(search: SearchConfig, *, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():  # qmc and gp are marked experimental: no user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sampler(search, seed=seed)


def _sampler(search: SearchConfig, *, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "grid":
        grid = {k: list(_choices(s)) for k, s in search.space.items()}  # type: ignore[arg-type]
        return optuna.samplers.GridSampler(grid, seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    # Parallel trials: 'constant_liar' keeps running trials from being sampled twice.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=min(10, max(2, search.num_trials // 3)))


def make_pruner(search: SearchConfig) -> optuna.pruners.BasePruner:
    """The pruner, the same in the driver and in every trial's process (each decides
    whether its own trial goes on, reading the others' reports from the storage)."""
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if search.pruner in ("successive_halving", "asha"):
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def storage_url(search: SearchConfig, run_path: Path, candidate: str) -> str:
    """The study's storage: the configured URL, or a SQLite file in the run folder."""
    if search.storage is not None:
        return search.storage
    return f"sqlite:///{(run_path / 'search' / f'{candidate}.db').resolve()}"


def shown_url(url: str) -> str:
    """The storage URL as it may be written down: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


@functools.cache
def open_storage(url: str, *, checked: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage, one per process and URL; SQLite waits for a writer in another
    process instead of failing. ``checked``: the driver has checked its schema's version
    already (a trial's worker skips Optuna's check, half a second of loading Alembic's
    revision scripts)."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs,
                                      skip_compatibility_check=checked)


