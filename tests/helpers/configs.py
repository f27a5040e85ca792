"""Small real configs for tests: the tiny digits pipeline, a tiny language model, and
writing or parsing them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from distml.config import Config, DataConfig, parse_config

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "sklearn:digits"},
    "train": {
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.005,
        "candidates": [
            {"name": "small", "model": {"type": "mlp", "hidden_sizes": [16]}},
            {"name": "cnn", "model": {"type": "cnn", "channels": [4], "hidden_size": 16}},
        ],
    },
}


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_config(raw: dict[str, Any], **kw: Any) -> Config:
    return parse_config(copy.deepcopy(raw), **kw)


def data_config(**kw: Any) -> DataConfig:
    """A validated ``data:`` section from keyword fields."""
    return DataConfig.model_validate(kw)


def small_lm_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    """A tiny transformer language model on a local text file (dropout on: verify turns it
    off), written to tmp_path/lm.yaml."""
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    raw["data"] = {"source": {"type": "text", "paths": ["corpus.txt"], "sequence_length": 32}}
    raw["train"].update(batch_size=16, lr=0.003)
    raw["train"]["candidates"] = [{"name": "gpt", "model": {
        "type": "transformer", "num_layers": 2, "num_heads": 2, "dim": 32, "dropout": 0.1}}]
    return write_config(tmp_path / "lm.yaml", raw)
