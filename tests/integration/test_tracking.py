"""Tracking: TensorBoard event files read back with tensorboard's own reader; MLflow runs read
back with MLflow's client from a real SQL store; scaling studies in the run report."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distml.data.ingest import ingest
from distml.data.tensors import SplitTensors
from distml.rundir import RunDir
from distml.training.candidate import train_candidate
from distml.training.telemetry.tensorboard import TensorBoardCallback
from tests.helpers.cli import distml
from tests.helpers.configs import TINY, make_config, write_config
from tests.helpers.net import free_port


def _events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """The folder of one ``distml run`` of the tiny config under ddp on two ranks, with
    TensorBoard (histograms every 10 steps), MLflow and system metrics on: run once, and
    only read by the tests of both trackers."""
    root = tmp_path_factory.mktemp("ddp-run")
    raw = {**copy.deepcopy(TINY), "output_dir": str(root / "runs"),
           "registry": str(root / "registry"),
           "monitor": {"mlflow": True, "histogram_every_steps": 10,
                       "system_metrics_interval_s": 0.05}}
    raw["train"]["parallel"] = {"strategy": "ddp", "world_size": 2}
    distml("run", str(write_config(root / "c.yaml", raw)), cwd=root)
    return root


def test_scalars_histograms_and_graph_per_candidate_from_rank_0_only(ddp_run):
    (run,) = (ddp_run / "runs" / "tiny").glob("2*")
    for cand in ("small", "cnn"):
        files = list((run / "tensorboard" / cand).iterdir())
        assert len(files) == 1  # rank 0 alone writes
        acc = _events(run / "tensorboard" / cand)
        tags = acc.Tags()
        assert {"train/loss", "train/lr", "train/samples_per_s", "val/accuracy",
                "epoch/data_stall", "epoch/peak_mem_bytes"} <= set(tags["scalars"])
        losses = acc.Scalars("train/loss")
        assert [e.step for e in losses] == list(range(1, 41))
        assert losses[-1].value < losses[0].value
        assert any(t.startswith("weights/") for t in tags["histograms"])
        assert any(t.startswith("grads/") for t in tags["histograms"])
        assert [e.step for e in acc.Histograms(tags["histograms"][0])] == [1, 10, 20, 30, 40]
        assert tags["graph"]
        for rank in (0, 1):  # every rank's system metrics, gathered to rank 0
            assert f"system/rank{rank}/rss_bytes_max" in tags["scalars"]
            assert f"system/rank{rank}/cpu_percent_mean" in tags["scalars"]
        rss = acc.Scalars("system/rank1/rss_bytes_max")
        assert len(rss) == 2  # one per epoch
        assert rss[0].value > 2**20
    result = json.loads((run / "candidates" / "small" / "result.json").read_text())
    system = result["epochs"][-1]["system"]
    assert len(system) == 2
    assert system[1]["samples"] >= 1


def test_an_unwritable_log_folder_warns_once_and_training_goes_on(tmp_path, tiny_raw, caplog):
    cfg = make_config(tiny_raw)
    manifest = ingest(cfg.data, tmp_path / "data", seed=0)
    (tmp_path / "not-a-folder").write_text("a file where the log folder would go")
    with caplog.at_level(logging.WARNING):
        result = train_candidate(
            cfg, cfg.train.candidates[0], manifest, val=SplitTensors.load(manifest, "val"),
            run=RunDir(tmp_path / "out"),
            callbacks=[TensorBoardCallback(tmp_path / "not-a-folder" / "tb")])
    assert result["steps"] == 40
    warnings = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1
    assert "training goes on without it" in warnings[0].getMessage()


def test_scale_ingestion_and_ddp_training(tmp_path, tiny_raw):
    # Small: the studies' reports are checked, not the speedups they measure.
    tiny_raw["data"] = {"source": {"type": "synthetic:classification", "n_samples": 8_000,
                                   "n_features": 8}, "rows_per_partition": 1_000}
    tiny_raw["train"]["epochs"] = 1
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    out = distml("scale", str(cfg), "--stage", "ingest", "--workers", "2,3", "--repeats", "2",
                 "--json", str(tmp_path / "ingest.json"), cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert "ingest, strong scaling" in text
    assert "Karp-Flatt" in text
    assert "3 workers on 2 cores" in text  # more workers than cores: said, not refused
    report = json.loads((tmp_path / "ingest.json").read_text())
    assert [p["workers"] for p in report["points"]] == [1, 2, 3]  # 1 added as the baseline
    assert {"workers", "seconds", "seconds_min", "seconds_max", "speedup", "efficiency",
            "karp_flatt"} <= set(report["points"][1])
    assert report["points"][1]["repeats"] == 2
    # Amdahl's law is fitted only to timings fit for it; otherwise the report says why.
    fitted = report["amdahl_parallel_fraction"]
    assert (fitted is None) == bool(report["warnings"])
    assert fitted is None or 0 <= fitted <= 1
    assert Path(report["plot"]).is_file()

    distml("scale", str(cfg), "--stage", "train", "--workers", "1,2", "--mode", "weak",
           "--repeats", "1", "--json", str(tmp_path / "train.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["mode"] == "weak"
    two = report["points"][1]  # Gustafson: serial fraction (N - scaled speedup) / (N - 1)
    assert report["gustafson_serial_fraction"] == pytest.approx(2 - two["speedup"])
    assert two["speedup"] == pytest.approx(2 * report["points"][0]["seconds"] / two["seconds"])
    assert report["points"][1]["seconds"] > 0

    # The next run's report shows both studies, plots included, and its throughput.
    tiny_raw["train"]["candidates"].pop()  # the cnn needs images
    distml("run", str(write_config(tmp_path / "c.yaml", tiny_raw)), "--set", "train.epochs=1",
           cwd=tmp_path)
    (run,) = (tmp_path / "runs" / "tiny").glob("2*/report.md")
    text = run.read_text()
    assert "### ingest, strong scaling" in text
    assert "### train of small, weak scaling" in text
    assert "| 3 |" in text  # the ingestion study's last point
    for png in ("scaling-ingest-strong.png", "scaling-train-weak.png", "throughput.png"):
        assert f"]({png})" in text
        assert (run.parent / png).stat().st_size > 1000


def test_mlflow_one_run_per_candidate_in_a_distributed_run(ddp_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{ddp_run / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == ["cnn", "small"]  # one each, not 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.params["train.parallel.world_size"] == "2"
    assert parent.data.params["train.candidates.1.model.type"] == "cnn"
    assert 0.5 < parent.data.metrics["test/accuracy"] <= 1
    assert len(parent.data.tags["distml.data_version"]) == 16  # the data's lineage
    small = next(r for r in children if r.info.run_name == "small")
    assert small.data.params["lr"] == "0.005"
    assert small.data.params["model.kwargs.hidden_sizes.0"] == "16"
    loss = client.get_metric_history(small.info.run_id, "train/loss")
    assert [m.step for m in loss] == list(range(1, 41))
    assert len(client.get_metric_history(small.info.run_id, "system/rank1/rss_bytes_max")) == 2
    assert {"model"} == {a.path for a in client.list_artifacts(small.info.run_id)}
    assert {"model.safetensors", "spec.json"} <= {
        Path(a.path).name for a in client.list_artifacts(small.info.run_id, "model")}
    assert "report/report.md" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    summary = json.loads(next((ddp_run / "runs" / "tiny").glob("2*/summary.json")).read_text())
    (version,) = client.search_model_versions("name='tiny'")
    assert version.run_id == parent.info.run_id
    assert version.tags["distml.candidate"] == summary["selected"]
    assert version.source.endswith("/model")


def test_an_unreachable_mlflow_server_warns_once_and_the_run_goes_on(tmp_path, tiny_raw):
    port = free_port()
    tiny_raw["train"]["epochs"] = 1
    tiny_raw["monitor"] = {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    out = distml("run", str(write_config(tmp_path / "c.yaml", tiny_raw)), cwd=tmp_path,
                 env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    text = out.stdout + out.stderr
    assert text.count("MLflow at http://127.0.0.1") == 1
    assert "MLflow tracking is off for the rest of this run" in text
    (run,) = (tmp_path / "runs" / "tiny").glob("2*")
    assert (run / "summary.json").is_file()
    assert not (run / "mlflow.json").exists()
    assert any((run / "tensorboard" / "small").iterdir())


FAILING_MODEL = '''
import torch
from torch import nn


class Failing(nn.Module):
    """Trains a few steps, then fails the way a real bug would."""

    def __init__(self, in_features, num_outputs):
        super().__init__()
        self.linear = nn.Linear(in_features, num_outputs)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        if self.calls > 3:
            raise RuntimeError("a bug in the model")
        return self.linear(x)
'''


def test_a_failed_training_run_ends_its_mlflow_parent_run_as_failed(tmp_path, tiny_raw):
    # Every entry point that opens the parent run closes it: `distml train` in this process,
    # and `python -m distml.train CONFIG` as torchrun starts it; neither leaves it RUNNING.
    from mlflow.tracking import MlflowClient

    (tmp_path / "failing.py").write_text(FAILING_MODEL)
    tiny_raw["train"]["candidates"] = [{"name": "bad", "model": {"type": "failing.py:Failing"}}]
    tiny_raw["monitor"] = {"mlflow": True, "system_metrics_interval_s": None}
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    out = distml("train", str(cfg), cwd=tmp_path, check=False)
    assert out.returncode != 0
    worker = subprocess.run([sys.executable, "-m", "distml.train", str(cfg)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode != 0
    assert "a bug in the model" in worker.stdout + worker.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    assert [r.info.status for r in parents] == ["FAILED", "FAILED"]
