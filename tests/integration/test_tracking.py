"""Tracking: TensorBoard event files read back with tensorboard's own reader."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distml.data.ingest import ingest
from distml.monitoring.tracking import TensorBoardCallback
from distml.training.candidate import SplitTensors, train_candidate
from tests.conftest import make_config, write_config
from tests.e2e.test_cli import distml


def _events(folder):
    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_scalars_histograms_and_graph_per_candidate_from_rank_0_only(tmp_path, tiny_raw):
    tiny_raw["train"].update(strategy="ddp", world_size=2)
    tiny_raw["monitor"] = {"histogram_every_steps": 10, "system_metrics_interval_s": 0.05}
    distml("train", str(write_config(tmp_path / "c.yaml", tiny_raw)), cwd=tmp_path)
    (run,) = (tmp_path / "runs" / "tiny").glob("2*")
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
            out_dir=tmp_path / "out",
            callbacks=[TensorBoardCallback(tmp_path / "not-a-folder" / "tb")])
    assert result["steps"] == 40
    warnings = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1
    assert "training goes on without it" in warnings[0].getMessage()


def test_scale_ingestion_and_ddp_training(tmp_path, tiny_raw):
    tiny_raw["data"] = {"source": {"type": "synthetic:classification", "n_samples": 40_000,
                                   "n_features": 8}, "rows_per_partition": 5_000}
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    out = distml("scale", str(cfg), "--stage", "ingest", "--workers", "2,3",
                 "--json", str(tmp_path / "ingest.json"), cwd=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert "ingest, strong scaling" in text
    assert "Karp-Flatt" in text
    assert "3 workers on 2 cores" in text  # more workers than cores: said, not refused
    report = json.loads((tmp_path / "ingest.json").read_text())
    assert [p["workers"] for p in report["points"]] == [1, 2, 3]  # 1 added as the baseline
    assert {"workers", "seconds", "speedup", "efficiency", "karp_flatt"} <= set(
        report["points"][1])
    assert 0 <= report["amdahl_parallel_fraction"] <= 1
    assert Path(report["plot"]).is_file()

    distml("scale", str(cfg), "--stage", "train", "--workers", "1,2", "--mode", "weak",
           "--json", str(tmp_path / "train.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "train.json").read_text())
    assert report["mode"] == "weak"
    assert report["gustafson_serial_fraction"] is not None
    assert report["points"][1]["seconds"] > 0
