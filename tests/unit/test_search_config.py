"""The ``search`` section: what it accepts, what it refuses before any trial (naming the
key, the value and what works), and how it maps onto Optuna."""

from __future__ import annotations

import copy
from typing import Any

import optuna
import pytest

from distml.errors import ConfigError
from distml.search.space import (
    decode,
    distributions,
    grid_size,
    make_pruner,
    make_sampler,
    shown_url,
)
from tests.helpers.configs import TINY, make_config


def searched(space: dict[str, Any], **kw: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY)
    raw["train"]["candidates"][0]["search"] = {"space": space, **kw}
    return raw


def test_a_space_maps_onto_optuna_and_back():
    cfg = make_config(searched({
        "lr": {"loguniform": [1e-4, 0.1]}, "batch_size": {"int": [16, 64], "step": 16},
        "model.hidden_sizes": {"choice": [[8], [16, 16]]},
        "model.dropout": {"uniform": [0, 0.5]}}))
    search = cfg.train.candidates[0].search
    d = distributions(search)
    assert d["lr"] == optuna.distributions.FloatDistribution(1e-4, 0.1, log=True)
    assert d["batch_size"] == optuna.distributions.IntDistribution(16, 64, step=16)
    assert d["model.hidden_sizes"].choices == ("[8]", "[16, 16]")  # lists as JSON text
    assert decode(search, {"model.hidden_sizes": "[16, 16]", "lr": 0.01}) == {
        "model.hidden_sizes": [16, 16], "lr": 0.01}
    # It round-trips through the saved config.
    assert make_config(cfg.to_dict()).hash() == cfg.hash()
    trial = cfg.train.candidates[0].with_values({"model.hidden_sizes": [16, 16]}, name="t")
    assert trial.model.hidden_sizes == [16, 16]
    assert trial.search is None


@pytest.mark.parametrize(("space", "kw", "match"), [
    ({"lr": {"between": [1, 2]}}, {}, r"search\.space\.lr: a space value is \{uniform"),
    ({"model.dropout": {"uniform": [0, 1.5]}}, {},
     r"space\.model\.dropout: the value 1\.5 makes an invalid candidate .*less than 1"),
    ({"model.widths": {"choice": [[8]]}}, {}, r"space\.model\.widths.*Extra inputs"),
    ({"batch_size": {"choice": [64, 0]}}, {}, r"space\.batch_size: the value 0"),
    ({"lr": {"loguniform": [0, 1]}}, {}, r"greater than 0"),
    ({"batch_size": {"int": [16, 64], "step": 16, "log": True}}, {}, r"log: true needs step 1"),
    ({"name": {"choice": ["a"]}}, {}, r"the candidate's name cannot be searched"),
    ({"lr": {"uniform": [1e-3, 1e-2]}}, {"sampler": "grid"},
     r"sampler grid needs every space value to be a choice; lr"),
    ({"lr": {"uniform": [1e-3, 1e-2]}}, {"pruner": "early"}, r"pruner"),
])
def test_a_bad_search_is_refused_when_the_config_loads(space, kw, match):
    with pytest.raises(ConfigError, match=match):
        make_config(searched(space, **kw))


def test_a_distributed_candidate_or_a_student_is_not_searched():
    raw = searched({"lr": {"choice": [0.01]}})
    raw["train"]["candidates"][0]["parallel"] = {"strategy": "ddp", "world_size": 2}
    with pytest.raises(ConfigError, match=r"search with strategy 'ddp': a trial runs on one "):
        make_config(raw)
    raw = searched({"lr": {"choice": [0.01]}})
    raw["train"]["candidates"][0]["distill"] = {"teacher": "cnn"}
    with pytest.raises(ConfigError, match=r"search of a distilled student"):
        make_config(raw)


def test_samplers_pruners_and_the_grid():
    cfg = make_config(searched({"lr": {"choice": [0.01, 0.1]},
                                "model.hidden_sizes": {"choice": [[8], [16], [32]]}},
                               sampler="grid", num_trials=50))
    search = cfg.train.candidates[0].search
    assert grid_size(search) == 6
    assert isinstance(make_sampler(search, seed=0), optuna.samplers.GridSampler)
    assert isinstance(make_pruner(search), optuna.pruners.MedianPruner)
    for name, cls in [("asha", optuna.pruners.SuccessiveHalvingPruner),
                      ("hyperband", optuna.pruners.HyperbandPruner),
                      ("none", optuna.pruners.NopPruner)]:
        assert isinstance(make_pruner(search.model_copy(update={"pruner": name})), cls)
    for name, cls in [("tpe", optuna.samplers.TPESampler),
                      ("random", optuna.samplers.RandomSampler),
                      ("qmc", optuna.samplers.QMCSampler), ("gp", optuna.samplers.GPSampler)]:
        assert isinstance(make_sampler(search.model_copy(update={"sampler": name}), seed=1),
                          cls)


def test_a_storage_url_is_written_down_without_its_password():
    assert shown_url("postgresql://user:secret@db:5432/s") == "postgresql://user:***@db:5432/s"
    assert shown_url("sqlite:////runs/r/search/c.db") == "sqlite:////runs/r/search/c.db"
