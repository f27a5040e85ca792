"""The exported Argo Workflow's steps, run here as its pods would run them, in one run folder:
`distml stage ingest`, a candidate per `torchrun -m distml.train --run-dir` (the TrainJob's
command, its PET_* nodes replaced by --standalone), `distml stage select`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.registry import Registry
from distml.train import main as train_main
from tests.helpers.configs import write_config

ROOT = Path(__file__).parents[2]


def _torchrun(run: Path, candidate: str, *flags: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *flags, "-m", "distml.train",
         "--run-dir", str(run), "--candidate", candidate],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_workflow_steps_share_one_run_folder(tmp_path, tiny_raw):
    tiny_raw["train"].update(epochs=1, max_steps=4)
    tiny_raw["execution"] = {"num_workers": 1}
    tiny_raw["monitor"] = {"tensorboard": False, "system_metrics_interval_s": None}
    tiny_raw["train"]["candidates"][0]["parallel"] = {"strategy": "ddp", "world_size": 2}
    cfg = write_config(tmp_path / "tiny.yaml", tiny_raw)
    run = tmp_path / "runs" / "tiny" / "tiny-x7k2p"  # <output_dir>/<name>/<workflow name>
    runner = CliRunner()

    result = runner.invoke(app, ["stage", "ingest", str(cfg), "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "config.yaml").is_file()
    assert (run / "data" / "manifest.json").is_file()

    result = runner.invoke(app, ["stage", "select", str(run)])
    assert result.exit_code == 2
    assert "candidate(s) small, cnn have no result.json yet" in " ".join(result.output.split())

    _torchrun(run, "small", "--standalone", "--nproc-per-node", "2")
    train_main(["--run-dir", str(run), "--candidate", "cnn"])  # single: this process will do
    result = runner.invoke(app, ["stage", "select", str(run)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert {c["name"] for c in summary["candidates"]} == {"small", "cnn"}
    assert {c["name"]: c["world_size"] for c in summary["candidates"]}["small"] == 2
    reg = Registry(tmp_path / "registry")
    assert reg.aliases("tiny") == {"production": summary["registry"]["version"]}
    assert (run / "report.md").is_file()


def test_ingest_refuses_a_run_folder_of_another_config(tmp_path, tiny_raw):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_raw)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((ROOT / "examples" / "digits.yaml").read_text())
    result = CliRunner().invoke(app, ["stage", "ingest", str(cfg), "--run-dir", str(run)])
    assert result.exit_code == 2
    assert "is a run of another config" in " ".join(result.output.split())


def test_select_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["stage", "select", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run folder (no config.yaml)" in " ".join(result.output.split())
