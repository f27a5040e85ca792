"""Elastic jobs' deal and settings: a resized epoch uses every row once, and the config
refuses a global batch that some world size the job may reach cannot split."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from distml.cli.pipeline import parse_nnodes
from distml.data.elastic import ElasticDeal
from distml.errors import ConfigError, DataError, DistmlError
from tests.helpers.configs import TINY, make_config

SIZES = [100, 37, 80, 53]  # 270 rows: 11 steps of 24, then one of 6


def _step_rows(deal: ElasticDeal, ids: np.ndarray, step: int, world: int) -> list[int]:
    """The rows of one step over all ranks (each rank's first micro-batches of the step)."""
    rows = []
    for rank in range(world):
        batches = deal.rank_batches(ids, start=step * deal.accum, rank=rank, world_size=world)
        for _ in range(deal.accum):
            rows += next(batches).tolist()
    return rows


def test_a_resized_epoch_uses_every_row_once_and_each_step_the_same_rows():
    deal = ElasticDeal(global_batch=24, accum=2, max_world=3)
    ids = deal.epoch_ids(SIZES, epoch=1, seed=7, shuffle=True, window_rows=48)
    assert sorted(ids.tolist()) == list(range(sum(SIZES)))
    assert ids.tolist() != sorted(ids.tolist())  # shuffled
    worlds = [2, 2, 2, 3, 3, 1, 1, 1, 2, 3, 2, 3]  # the world size at each of the 12 steps
    used = np.zeros(sum(SIZES), int)
    for step, world in enumerate(worlds):
        rows = _step_rows(deal, ids, step, world)
        assert sorted(rows) == sorted(_step_rows(deal, ids, step, 2))  # the same rows
        np.add.at(used, rows, 1)
    assert (used == 1).all()


def test_a_deal_refuses_a_last_step_too_short_for_the_ranks():
    with pytest.raises(DataError, match="batch_size=24"):
        ElasticDeal(global_batch=24, accum=2, max_world=4).check(sum(SIZES), 2)
    ElasticDeal(global_batch=24, accum=2, max_world=3).check(sum(SIZES), 2)


def _elastic(**parallel):
    raw = copy.deepcopy(TINY)
    raw["train"]["batch_size"] = 48
    raw["train"]["parallel"] = {"strategy": "ddp", "world_size": 2, "num_nodes": 2,
                                "min_nodes": 1, "max_nodes": 3, **parallel}
    return make_config(raw)


def test_elastic_settings_cover_every_world_size():
    settings = _elastic().train.settings_for(_elastic().train.candidates[0])
    assert settings.parallel.world_sizes == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"batch_size=48 .* 5 ranks .* multiple of 60"):
        _elastic(max_nodes=5)
    with pytest.raises(ConfigError, match="min_nodes=3 is more than max_nodes=2"):
        _elastic(min_nodes=3, max_nodes=2)
    with pytest.raises(ConfigError, match="strategy 'tensor'"):
        _elastic(strategy="tensor")


def test_nnodes_takes_a_count_or_a_range():
    assert parse_nnodes("2") == (2, [])
    assert parse_nnodes("1:3") == (None, ["train.parallel.min_nodes=1",
                                          "train.parallel.max_nodes=3"])
    for bad in ("0", "3:1", "a:b", ":2"):
        with pytest.raises(DistmlError, match="MIN:MAX"):
            parse_nnodes(bad)
