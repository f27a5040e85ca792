"""The CLI end to end, as a user runs it: real subprocesses, real files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from distml.artifact import load_artifact
from distml.registry import Registry
from tests.helpers.cli import ROOT, distml
from tests.helpers.configs import write_config


def _summary(run_root: Path) -> dict:
    (path,) = run_root.glob("*/summary.json")
    return json.loads(path.read_text())


def test_help_documents_every_command(tmp_path):
    out = distml("--help", cwd=tmp_path).stdout
    for command in ("run", "ingest", "train", "models", "version"):
        assert command in out
    assert "promote" in distml("models", "--help", cwd=tmp_path).stdout
    assert "distml 0.1.0, torch" in distml("version", cwd=tmp_path).stdout


def test_run_tiny_config_end_to_end(tmp_path, tiny_raw):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_raw)
    distml("run", str(cfg), cwd=tmp_path)
    s = _summary(tmp_path / "runs" / "tiny")
    assert {"name", "selected", "candidates", "test", "stages", "artifact"} <= s.keys()
    assert [st["name"] for st in s["stages"]] == ["ingest", "train", "select", "report"]
    assert {c["name"] for c in s["candidates"]} == {"small", "cnn"}
    for c in s["candidates"]:
        assert {"name", "params", "val", "train_seconds"} <= c.keys()
        assert c["params"] > 0
        assert 0 <= c["data_stall"] < 1
        assert [e["epoch"] for e in c["epochs"]] == [0, 1]
        assert all(e["samples_per_s"] > 0 for e in c["epochs"])
        assert c["step_seconds"] > 0
        assert len(c["peak_mem_bytes_per_rank"]) == 1
        assert c["peak_mem_bytes_per_rank"][0] > 2**20
    assert s["test"]["accuracy"] > 0.5
    run_dir = Path(s["run_dir"]) if Path(s["run_dir"]).is_absolute() else tmp_path / s["run_dir"]
    for name in ("report.md", "loss_curves.png", "confusion_matrix.png", "config.yaml",
                 "data/manifest.json"):
        assert (run_dir / name).is_file(), name
    assert "Candidates, ranked by validation accuracy" in (run_dir / "report.md").read_text()
    reg = Registry(tmp_path / "registry")
    assert reg.aliases("tiny") == {"production": 1}
    spec = load_artifact(reg.resolve("tiny@production").path).spec
    assert spec["candidate"] == s["selected"]
    assert spec["metrics"]["test"] == s["test"]
    assert spec["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert len(spec["preprocessing"][0]["mean"]) == 64
    assert spec["labels"][0] == "0"

    # A worse second run is registered but does not take production.
    distml("run", str(cfg), "--set", "train.lr=1e-9", "--set", "train.epochs=1",
           "--set", "train.warmup_steps=0", cwd=tmp_path)
    assert reg.aliases("tiny") == {"production": 1}
    assert [v.version for v in reg.versions("tiny")] == [1, 2]
    listing = distml("models", "list", "--registry", str(tmp_path / "registry"), cwd=tmp_path)
    assert "tiny" in listing.stdout
    assert "production→1" in listing.stdout
    distml("models", "promote", "tiny", "2", "--registry", "registry", cwd=tmp_path)
    assert reg.aliases("tiny") == {"production": 2}
    shown = distml("models", "show", "tiny@production", "--registry", "registry", cwd=tmp_path)
    assert '"candidate"' in shown.stdout
    assert "version 2" in shown.stdout


def test_train_one_candidate_then_resume_reuses_it(tmp_path, tiny_raw):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_raw)
    distml("train", str(cfg), "--candidate", "cnn", cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs" / "tiny").glob("2*")
    assert [p.name for p in (run_dir / "candidates").iterdir()] == ["cnn"]
    assert (run_dir / "candidates" / "cnn" / "checkpoints").is_dir()
    out = distml("train", str(cfg), "--candidate", "cnn", "--resume", cwd=tmp_path)
    assert "already trained" in out.stdout + out.stderr
    assert len(list((tmp_path / "runs" / "tiny").glob("2*"))) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=-1"], "train.lr = -1: Input should be greater than 0"),
        (["--set", "data.source=missing.csv"], "missing.csv' does not exist"),
        (["--candidate", "nope"], "no candidate named 'nope'"),
        (["--resume"], "nothing to resume"),
        (["--set", "train.candidates.0.model={type: cnn, image_shape: [1, 4, 4]}"],
         "image_shape=[1, 4, 4] holds 1*4*4=16 values but the data has 64 features"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_no_traceback(tmp_path, tiny_raw, args, message):
    cfg = write_config(tmp_path / "tiny.yaml", tiny_raw)
    proc = distml("train", str(cfg), *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr + proc.stdout


def test_user_model_and_user_data_file_through_run(tmp_path, tiny_raw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    y = np.where(x[:, 0] + x[:, 1] > 0, "pos", "neg")
    x[7, 2] = np.nan  # one bad row, dropped on request
    pcsv.write_csv(pa.table({**{f"f{i}": x[:, i] for i in range(5)}, "target": y}),
                   tmp_path / "table.csv")
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "def linear(*, in_features, num_outputs, bias=True):\n"
        "    return torch.nn.Linear(in_features, num_outputs, bias=bias)\n"
    )
    tiny_raw["data"] = {"source": {"path": "table.csv", "label_column": "target"},
                        "drop_invalid": True}
    tiny_raw["train"].update(epochs=20, lr=0.05)
    tiny_raw["train"]["candidates"] = [
        {"name": "linear", "model": {"type": "userpkg.nets:linear", "kwargs": {"bias": True}}}]
    cfg = write_config(tmp_path / "user.yaml", tiny_raw)
    distml("run", str(cfg), cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    s = _summary(tmp_path / "runs" / "tiny")
    assert s["selected"] == "linear"
    assert s["data"]["dropped_invalid_rows"] == 1
    assert s["test"]["accuracy"] > 0.9
    spec = json.loads((Path(s["artifact"]) if Path(s["artifact"]).is_absolute()
                       else tmp_path / s["artifact"]).joinpath("spec.json").read_text())
    assert spec["model"]["type"] == "userpkg.nets:linear"
    assert spec["labels"] == ["neg", "pos"]
    assert spec["feature_names"][0] == "f0"


def test_nan_features_fail_with_a_count(tmp_path, tiny_raw):
    x = np.ones((50, 2))
    x[[1, 2], 0] = np.inf
    pcsv.write_csv(pa.table({"a": x[:, 0], "b": x[:, 1], "label": [0, 1] * 25}),
                   tmp_path / "t.csv")
    tiny_raw["data"] = {"source": "t.csv"}
    proc = distml("ingest", str(write_config(tmp_path / "c.yaml", tiny_raw)), cwd=tmp_path,
                  check=False)
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "2 of 50 rows have NaN or infinite values (first rows: [1, 2])" in message
    assert "impute (data.transforms: [impute, ...])" in message
    assert "Warning" not in message


def test_ingest_prints_the_manifest_summary(tmp_path, tiny_raw):
    out = distml("ingest", str(write_config(tmp_path / "c.yaml", tiny_raw)), cwd=tmp_path).stdout
    assert re.search(r"train\s+│\s+1,2\d\d\s+│\s+1 ", out)  # ~70% of 1,797 rows, 1 partition
    assert "task classification" in out
    (run_dir,) = (tmp_path / "runs" / "tiny").glob("2*")
    shown = distml("data", "inspect", str(run_dir), cwd=tmp_path).stdout
    assert "1,797 rows in 3 partitions" in shown
    assert "preprocessing: standardize" in shown
    assert "pixel_0_0" in shown


def test_transformer_on_local_text(tmp_path, tiny_raw):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tiny_raw["data"] = {"source": {"type": "text", "paths": ["corpus.txt"],
                                   "sequence_length": 16}}
    tiny_raw["train"].update(epochs=6, batch_size=16, lr=0.01)
    tiny_raw["train"]["candidates"] = [
        {"name": "gpt", "model": {"type": "transformer", "num_layers": 1, "num_heads": 2,
                                  "dim": 32}}]
    distml("run", str(write_config(tmp_path / "lm.yaml", tiny_raw)), cwd=tmp_path)
    s = _summary(tmp_path / "runs" / "tiny")
    assert s["metric"] == "perplexity"
    assert s["test"]["perplexity"] < 5
    art = load_artifact(Registry(tmp_path / "registry").resolve("tiny").path)
    assert art.spec["inputs"][0] == {"name": "tokens", "datatype": "INT64", "shape": [-1, 16]}


@pytest.mark.slow
def test_main_job_digits_reaches_95_percent(tmp_path):
    distml("run", str(ROOT / "examples" / "digits.yaml"), "--quiet",
           "--set", f"output_dir={tmp_path / 'runs'}", "--set", f"registry={tmp_path / 'reg'}",
           cwd=tmp_path)
    s = _summary(tmp_path / "runs" / "digits")
    assert len(s["candidates"]) == 3
    assert s["test"]["accuracy"] >= 0.95


def test_runs_list_and_compare(tmp_path, tiny_raw):
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]  # (two runs of one)
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    distml("run", str(cfg), "-q", cwd=tmp_path)
    distml("run", str(cfg), "-q", "--set", "train.lr=0.02", "--set", "train.cnn.lr=0",
           cwd=tmp_path, check=False)  # a bad override: refused, no run
    distml("run", str(cfg), "-q", "--set", "train.lr=0.02", cwd=tmp_path)
    listing = distml("runs", "list", "--output-dir", "runs", cwd=tmp_path).stdout
    assert listing.count("tiny/2") == 2
    assert "accuracy" in listing
    a, b = sorted((tmp_path / "runs" / "tiny").glob("2*"))
    shown = distml("runs", "compare", str(a), str(b), cwd=tmp_path).stdout
    assert re.search(r"train\.lr\s*│\s*0\.005\s*│\s*0\.02", shown)
    assert re.search(r"test accuracy\s*│\s*0\.\d+\s*│\s*0\.\d+", shown)
    assert "val small" in shown
    assert "train.epochs" not in shown  # only what differs
    proc = distml("runs", "compare", str(a), str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "is not a finished run (no summary.json)" in " ".join(proc.stderr.split())
