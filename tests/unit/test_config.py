from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from distml.config import CustomModelSpec, FileSource, load_config
from distml.config.executors import ENGINES
from distml.errors import ConfigError
from tests.helpers.configs import make_config, write_config


def test_example_configs_load():
    root = Path(__file__).parents[2] / "examples"
    digits = load_config(root / "digits.yaml")
    assert [c.name for c in digits.train.candidates] == ["mlp", "mlp-wide", "cnn"]
    assert digits.metric == "accuracy"
    kd = load_config(root / "distill.yaml")
    assert [c.name for c in kd.train.training_order()] == ["cnn", "small-distilled", "small"]
    assert kd.train.candidate("small-distilled").distill.teachers == ["cnn"]
    assert kd.train.candidate("small-distilled").distill.transfer.labelled
    assert kd.data.split.unlabelled == 0.72
    lm = load_config(root / "transformer.yaml")
    assert lm.data.task == "language_modeling"
    assert lm.metric == "perplexity"


def test_candidate_inherits_and_overrides(tiny_raw):
    tiny_raw["train"]["candidates"][1]["lr"] = 0.1
    cfg = make_config(tiny_raw)
    small, cnn = cfg.train.candidates
    assert cfg.train.settings_for(small).lr == 0.005
    assert cfg.train.settings_for(cnn).lr == 0.1
    assert cfg.train.settings_for(cnn).epochs == 2


def test_set_overrides_parse_yaml_values(tiny_raw):
    cfg = make_config(tiny_raw, overrides=["train.epochs=7", "train.candidates.0.lr=0.5",
                                           "data.split={train: 0.8, val: 0.1, test: 0.1}"])
    assert cfg.train.epochs == 7
    assert cfg.train.settings_for(cfg.train.candidates[0]).lr == 0.5
    assert cfg.data.split.train == 0.8


def test_hash_ignores_key_order(tiny_raw):
    reordered = dict(reversed(list(tiny_raw.items())))
    assert make_config(tiny_raw).hash() == make_config(reordered).hash()


def test_relative_paths_resolve_against_config_folder(tiny_raw, tmp_path):
    tiny_raw["data"]["source"] = "data/train.csv"
    tiny_raw["train"]["candidates"][0]["model"] = {"type": "models/net.py:build"}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_raw))
    assert isinstance(cfg.data.source, FileSource)
    assert cfg.data.source.path == tmp_path / "data" / "train.csv"
    spec = cfg.train.candidates[0].model
    assert isinstance(spec, CustomModelSpec)
    assert spec.type == f"{tmp_path / 'models' / 'net.py'}:build"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.bogus=1", r"train\.bogus = 1: unknown key"),
        ("train.lr=-0.1", r"train\.lr = -0\.1: Input should be greater than 0"),
        ("train.parallel.world_size=0",
         r"train\.parallel\.world_size = 0: .*greater than or equal to 1"),
        ("train.parallel.world_size=2", r"world_size=2 needs a distributed strategy"),
        ("train.batch_size=abc", r"train\.batch_size = 'abc': .*valid integer"),
        ("train.candidates.1.name=small", r"two candidates are named 'small'"),
        ("select.metric=perplexity", r"select\.metric='perplexity' cannot be computed for a "
                                     r"classification task; use one of: accuracy, f1_macro, loss"),
        ("train.candidates.0.model.type=resnet",
         r"train\.candidates\[0\]\.model\.type = 'resnet': model type must be one of mlp"),
        ("train.candidates.0.model.hidden_sizes=[0]",
         r"train\.candidates\[0\]\.model\.hidden_sizes\[0\] = 0"),
        ("train.candidates.1.lr=-3", r"train\.candidates\[1\]\.lr = -3"),
        ("train.candidates.1.grad_accum_steps=5",
         r"candidate 'cnn': batch_size=64 is not divisible by data-parallel ranks x "
         r"grad_accum_steps"
         r"=1 x 5=5"),
        ("train.parallel.world_size=128",
         r"world_size=128 is larger than the global batch_size=64: every rank needs samples"),
        ("train.candidates.0.parallel.fsdp.reshard_after_forward=false",
         r"candidate 'small': parallel\.fsdp applies to strategy fsdp, not 'single'"),
        ("train.parallel={strategy: ddp, world_size: 3, num_nodes: 2}",
         r"world_size=3 does not divide over num_nodes=2"),
        ("train.schedule=gpipe", r"train\.schedule = 'gpipe': unknown key"),
        ("monitor.mlflow.tracking_uri=file:///tmp/mlruns",
         r"monitor\.mlflow\.tracking_uri = 'file:///tmp/mlruns': MLflow's file store .* "
         r"use sqlite:///path/to/mlflow\.db"),
        ("monitor.mlflow.tracking_uri=./mlruns", r"MLflow's file store"),
        ("train.candidates.0.max_restarts=2",
         r"candidate 'small': max_restarts=2 needs checkpoints to restart from"),
        ("data.split.train=0.5", r"data\.split: train \+ val \+ test = 0\.8; .*add up to 1"),
        ("data.source={type: synthetic:classification, n_classes: 1}",
         r"data\.source\.n_classes = 1: .*greater than or equal to 2"),
        ("data.transforms=[standardize]", r"data\.transforms=\['standardize'\] apply to feature "
                                           r"columns; a text source takes none"),
        ("data.transforms=[{type: clip}]", r"data\.transforms\[0\]: clip needs min, max or both"),
        ("data.transforms=[normalize]",
         r"data\.transforms\[0\]\.type = 'normalize': transform type must be one of standardize"),
        ("execution.executor=flink://x", r"executor = 'flink://x': not an executor; use local, "),
        ("train.candidates=[]", r"train\.candidates = \[\]: List should have at least 1 item"),
        ("name=has space", r"name = 'has space': not a valid name: use 1-100 letters"),
        ("train.candidates.0.model={type: transformer, dim: 30, num_heads: 4}",
         r"dim=30 is not divisible by num_heads=4"),
        ("train.epochs", r"--set 'train.epochs' is not KEY=VALUE"),
    ],
)
def test_config_errors_name_field_value_and_fix(tiny_raw, override, match):
    if override.startswith("data.transforms=[standardize]"):
        tiny_raw["data"]["source"] = {"type": "text", "paths": ["a.txt"]}
    if "max_restarts" in override:
        tiny_raw["train"]["checkpoints"] = False
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_raw, overrides=[override])


def test_missing_required_section(tiny_raw):
    del tiny_raw["train"]
    with pytest.raises(ConfigError, match=r"train: required key is missing"):
        make_config(tiny_raw)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of sections, got list"):
        load_config(bad)


def test_unknown_candidate_name(tiny_raw):
    cfg = make_config(tiny_raw)
    with pytest.raises(ConfigError, match=r"no candidate named 'big'; the config has: small, cnn"):
        cfg.train.candidate("big")


@pytest.mark.parametrize(("value", "expected"), [
    (True, {"tracking_uri": None, "experiment": None, "register_model": True}),
    ({"tracking_uri": "http://h:5000", "register_model": False},
     {"tracking_uri": "http://h:5000", "experiment": None, "register_model": False}),
    (False, None),
    (None, None),
])
def test_monitor_mlflow_is_a_switch_or_settings(tiny_raw, value, expected):
    tiny_raw["monitor"] = {"mlflow": value}
    mlflow = make_config(tiny_raw).monitor.mlflow
    assert (mlflow.model_dump() if mlflow else None) == expected


def test_monitor_mlflow_rejects_unknown_keys(tiny_raw):
    tiny_raw["monitor"] = {"mlflow": {"uri": "x"}}
    with pytest.raises(ConfigError, match=r"monitor\.mlflow\.uri"):
        make_config(tiny_raw)


def _mlp(*hidden: int) -> dict:
    return {"candidates": [{"name": "m", "model": {"type": "mlp", "hidden_sizes": list(hidden)}}]}


@pytest.mark.parametrize(("parallel", "train", "match"), [
    ({"strategy": "tensor", "world_size": 2}, {},
     r"'cnn': strategy tensor needs a tensor-parallel plan, and the cnn has none"),
    ({"strategy": "pipeline", "world_size": 4}, _mlp(16, 16),
     r"4 pipeline stages \(pipeline degree x virtual_stages under interleaved-1f1b\) is "
     r"more than the model's 3 layers; use at most 3"),
    ({"strategy": "pipeline", "world_size": 2, "pipeline": {"num_microbatches": 3}}, {},
     r"64 samples per pipeline, which do not divide into num_microbatches=3"),
    ({"strategy": "tensor", "world_size": 4, "data_degree": 3}, {},
     r"data_degree x tensor_degree = 3 x the rest does not multiply to world_size=4"),
    ({"strategy": "tensor", "world_size": 4, "data_degree": -1, "tensor_degree": -1}, {},
     r"only one of data_degree and tensor_degree may be -1"),
    ({"strategy": "ddp", "world_size": 2},
     {"candidates": [{"name": "m", "model": {"type": "mlp"}, "parallel": {
         "fsdp": {"offload": True}}}]},
     r"candidate 'm': parallel\.fsdp applies to strategy fsdp, not 'ddp'"),
    ({"strategy": "fsdp", "world_size": 2}, {"precision": "fp16"},
     r"precision fp16 with strategy 'fsdp'.*use bf16"),
    ({"strategy": "pipeline", "world_size": 2}, {"grad_accum_steps": 2},
     r"pipeline accumulates over parallel\.pipeline\.num_microbatches"),
    ({"strategy": "ddp", "world_size": 2},
     {"candidates": [{"name": "m", "model": {"type": "mlp"}, "parallel": {
         "pipeline": {"degree": 2}}}]},
     r"parallel\.pipeline applies to strategy pipeline or 3d, not 'ddp'"),
    ({"strategy": "ddp", "world_size": 2},
     {"candidates": [{"name": "m", "model": {"type": "mlp"}, "parallel": {
         "tensor_degree": 2}}]},
     r"parallel\.tensor_degree applies to strategy tensor or 3d, not 'ddp'"),
    ({"strategy": "tensor", "world_size": 2}, _mlp(15),
     r"hidden_sizes=\[15\] cannot be split over tensor_degree=2"),
    ({"strategy": "pipeline", "world_size": 2, "pipeline": {"stage_split": [1, 1]}}, _mlp(8, 8),
     r"stage_split=\[1, 1\] must give 2 positive layer counts that sum to the model's 3"),
    # 3d: all three degrees, one of them at most left to the rest; the pipeline and tensor
    # checks both apply.
    ({"strategy": "3d", "world_size": 8, "tensor_degree": 2}, _mlp(16, 16),
     r"strategy 3d: data_degree and pipeline\.degree are both left to 'the rest'; give all "
     r"but one of data_degree, pipeline\.degree, tensor_degree"),
    ({"strategy": "3d", "world_size": 8, "data_degree": 2, "tensor_degree": 3}, _mlp(16, 16),
     r"data_degree x pipeline\.degree x tensor_degree = 2 x the rest x 3 does not multiply "
     r"to world_size=8"),
    ({"strategy": "3d", "world_size": 8, "data_degree": 2, "tensor_degree": 2}, _mlp(15, 16),
     r"hidden_sizes=\[15, 16\] cannot be split over tensor_degree=2"),
    ({"strategy": "3d", "world_size": 8, "data_degree": 1, "tensor_degree": 2}, _mlp(16, 16),
     r"4 pipeline stages .* is more than the model's 3 layers"),
    ({"strategy": "3d", "world_size": 8, "data_degree": 2, "pipeline": {"degree": 2}}, {},
     r"'cnn': strategy 3d needs a tensor-parallel plan, and the cnn has none"),
])
def test_impossible_model_splits_are_refused_at_load(tiny_raw, parallel, train, match):
    tiny_raw["train"].update(parallel=parallel, **train)
    with pytest.raises(ConfigError, match=match):
        make_config(tiny_raw)


def test_degrees_resolve_against_the_world_size(tiny_raw):
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]
    cases = [({"strategy": "tensor", "world_size": 2}, (1, 2, 1)),
             ({"strategy": "tensor", "world_size": 4, "data_degree": 2}, (2, 2, 1)),
             ({"strategy": "pipeline", "world_size": 4, "pipeline": {"degree": 2}}, (2, 1, 2)),
             ({"strategy": "ddp", "world_size": 4}, (4, 1, 1)),
             ({"strategy": "3d", "world_size": 8, "data_degree": 2, "tensor_degree": 2},
              (2, 2, 2)),
             ({"strategy": "3d", "world_size": 4, "tensor_degree": 2,
               "pipeline": {"degree": 2}}, (1, 2, 2))]
    for parallel, (data, tensor, pipeline) in cases:
        raw = {**tiny_raw, "train": {**tiny_raw["train"], "parallel": parallel}}
        dims = make_config(raw).train.dims
        assert (dims.data, dims.tensor, dims.pipeline) == (data, tensor, pipeline)


def test_candidates_deep_merge_the_parallel_settings(tiny_raw):
    tiny_raw["train"]["parallel"] = {"strategy": "pipeline", "world_size": 2,
                                     "pipeline": {"schedule": "gpipe", "num_microbatches": 2}}
    tiny_raw["train"]["candidates"] = [
        {"name": "a", "model": {"type": "mlp", "hidden_sizes": [8]},
         "parallel": {"pipeline": {"num_microbatches": 4}}},
        {"name": "b", "model": {"type": "mlp", "hidden_sizes": [8]},
         "parallel": {"strategy": "ddp", "pipeline": {"schedule": "interleaved-1f1b"}}}]
    with pytest.raises(ConfigError, match=r"candidate 'b': parallel\.pipeline applies to "
                                          r"strategy pipeline or 3d, not 'ddp'"):
        make_config(tiny_raw)
    del tiny_raw["train"]["candidates"][1]["parallel"]["pipeline"]
    cfg = make_config(tiny_raw)
    a, b = (cfg.train.settings_for(c).parallel for c in cfg.train.candidates)
    # a keeps the shared schedule and world size and changes only the micro-batches; b, a
    # ddp, inherits no pipeline settings (the shared ones are defaults for pipelines)
    assert (a.strategy, a.world_size, a.pipeline.schedule, a.pipeline.num_microbatches) == (
        "pipeline", 2, "gpipe", 4)
    assert (b.strategy, b.world_size, b.pipeline.schedule) == ("ddp", 2, "1f1b")
    # the saved config keeps only what each candidate overrides, and loads back the same
    assert cfg.to_dict()["train"]["candidates"][0]["parallel"] == {
        "pipeline": {"num_microbatches": 4}}
    assert make_config(cfg.to_dict()).hash() == cfg.hash()


def test_a_parameter_server_student_is_refused_at_load(tiny_raw):
    """Before any teacher trains: the parameter-server loop takes no student's loss."""
    tiny_raw["train"]["candidates"][1].update(
        distill={"teacher": "small"},
        parallel={"strategy": "parameter_server", "world_size": 2})
    with pytest.raises(ConfigError, match=r"candidate 'cnn': distill with strategy "
                                          r"'parameter_server'.*use strategy single, ddp, "
                                          r"zero1, fsdp, tensor, pipeline or 3d for the student"):
        make_config(tiny_raw)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_every_executor_form_of_the_engine_table_loads_and_has_its_module(tiny_raw, engine):
    record = ENGINES[engine]
    assert callable(importlib.import_module(record.module).make)
    for form in record.forms:
        value = form.replace("HOST:PORT", "10.0.0.1:8786")
        assert make_config({**tiny_raw, "execution": {"executor": value}}).execution.executor \
            == value
