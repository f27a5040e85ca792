"""README stays true: every config key and every CLI command is documented there."""

from __future__ import annotations

from pathlib import Path

import pytest
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
    config.ParameterServerConfig, config.WatchConfig,
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
