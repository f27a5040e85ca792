"""README stays true: every config key and every CLI command is documented there, and its
benchmark table and the figures its notes quote are the saved results."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.__main__ import table_rows
from bench.common import FIGURE, load_results, render_readme
from bench.drift import detail_table
from pydantic import BaseModel

from distml import config
from distml.cli import app

README = (Path(__file__).parents[2] / "README.md").read_text()

SECTIONS: list[type[BaseModel]] = [
    config.Config, config.DataConfig, config.SplitConfig, config.TrainConfig, config.Candidate,
    config.SelectConfig, config.ExecutionConfig, config.SyntheticClassificationSource,
    config.SyntheticRegressionSource, config.TextSource, config.FileSource, config.MLPSpec,
    config.CNNSpec, config.TransformerSpec, config.CustomModelSpec, config.LoaderConfig,
    config.StandardizeSpec, config.MinMaxSpec, config.ImputeSpec, config.ClipSpec,
    config.OneHotSpec, config.MonitorConfig, config.MlflowConfig, config.ServeConfig,
    config.ParallelConfig, config.PipelineConfig, config.FsdpConfig, config.DistillConfig,
    config.TransferConfig,
    config.ParameterServerConfig, config.WatchConfig, config.DriftConfig, config.ClicksSource,
    config.ClickSpec, config.HashSpec,
]


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_every_config_key_is_in_the_readme(section):
    missing = [k for k in section.model_fields if f"`{k}`" not in README]
    assert not missing, f"README's config reference lacks {section.__name__}: {missing}"


def test_every_command_is_in_the_readme():
    commands = [f"distml {c.name or c.callback.__name__}" for c in app.registered_commands]
    for group in app.registered_groups:  # models, data, runs, export, stage, ...
        commands += [f"distml {group.name} {c.name}"
                     for c in group.typer_instance.registered_commands]
    assert {"distml models show", "distml data inspect", "distml runs list"} <= set(commands)
    missing = [c for c in commands if c not in README]
    assert not missing, f"README's CLI section lacks {missing}"


def test_the_benchmark_table_and_every_quoted_figure_are_the_saved_results():
    results = load_results()
    quoted = {m["path"].split("/")[0] for m in FIGURE.finditer(README)}
    assert {"serve", "param_server", "distill"} <= quoted
    # Any figure that differs from bench/results/*.json (or a path that is not there) fails.
    assert render_readme(README, table_rows(results), results) == README, (
        "README's benchmark table or a quoted figure differs from bench/results: "
        "run `python -m bench` (it rewrites both) or correct the note")
    assert detail_table(results["drift"]) in README
