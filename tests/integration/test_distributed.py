"""Distributed training on real processes (gloo on CPU): verify, faults, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.helpers.cli import ROOT, distml
from tests.helpers.configs import small_lm_config, write_config
from tests.helpers.distributed import ENV, resume_with_no_more_steps, verify
from tests.helpers.procs import training_ranks


@pytest.mark.parametrize("candidate", ["mlp-wide", "cnn"])
def test_verify_passes_on_the_digits_candidates(tmp_path, candidate):
    _, report = verify(
        tmp_path, ROOT / "examples" / "digits.yaml", "--candidate", candidate,
        "--set", f"output_dir={tmp_path / 'runs'}", "--set", "train.grad_accum_steps=2")
    assert report["world_size"] == 2
    assert report["steps"] == 20
    assert [r["strategy"] for r in report["results"]] == ["ddp", "zero1", "fsdp", "fsdp-zero2"]
    for r in report["results"]:
        assert r["passed"], r
        assert r["max_rel_loss_diff"] < 1e-4
        assert r["max_rel_param_diff"] < 1e-4
        assert r["peak_mem_bytes"] > 0
    state = {r["strategy"]: r["state_bytes_per_rank"] for r in report["results"]}
    # Sharding shows in what each rank holds. ddp: everything on every rank. zero1: the
    # optimizer state split in halves (by elements, not whole tensors). fsdp: parameters,
    # gradients and optimizer state split about evenly.
    ddp = state["ddp"][0]
    assert state["ddp"][1] == ddp
    for share in (b["optimizer"] for b in state["zero1"]):
        assert abs(share - ddp["optimizer"] / 2) < 0.01 * ddp["optimizer"]
    for kind in ("params", "grads", "optimizer"):
        shards = [b[kind] for b in state["fsdp"]]
        assert sum(shards) >= ddp[kind]  # (padding may round a shard up)
        assert max(shards) < 0.6 * ddp[kind]


def test_verify_passes_on_the_small_transformer(tmp_path, tiny_raw):
    _, report = verify(tmp_path, small_lm_config(tmp_path, tiny_raw))
    assert all(r["passed"] for r in report["results"]), report["results"]


def test_a_wrong_strategy_fails_verify(tmp_path, tiny_raw):
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    # SGD: Adam's update barely changes when every gradient doubles, which is exactly why
    # summing instead of averaging goes unnoticed in practice.
    proc, report = verify(tmp_path, cfg, "--strategies", "ddp,tests.helpers.strategies:SummedDDP",
                           "--set", "train.optimizer=sgd", "--set", "train.grad_clip=null",
                           check=False)
    assert proc.returncode == 1
    ok, wrong = report["results"]
    assert ok["passed"]
    assert not wrong["passed"]
    assert wrong["max_rel_param_diff"] > 1e-3
    assert "FAIL" in proc.stdout


def _rank_pid(rank: int, parent: int) -> int | None:
    """The pid of a distml.train worker of ``parent``'s tree with RANK=rank."""
    return next(iter(training_ranks(rank, parent)), None)


def test_a_killed_rank_restarts_from_the_checkpoint_bit_for_bit(tmp_path, tiny_raw):
    tiny_raw["train"].update(parallel={"strategy": "ddp", "world_size": 2}, epochs=3,
                             checkpoint_every_steps=5, max_restarts=1, restore_best=False)
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]
    tiny_raw["data"] = {"source": "sklearn:digits",
                        "loader": {"map_fn": "tests.helpers.slow:sleepy"}}
    tiny_raw["monitor"] = {"mlflow": True, "system_metrics_interval_s": None}
    cfg = write_config(tmp_path / "c.yaml", tiny_raw)
    distml("train", str(cfg), cwd=tmp_path, env=ENV)  # uninterrupted
    (clean,) = (tmp_path / "runs" / "tiny").glob("2*")

    marker = str(os.getpid())
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", str(cfg)], cwd=tmp_path,
        env={**os.environ, **ENV, "DISTML_TEST_PARENT": marker},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        runs = [p for p in (tmp_path / "runs" / "tiny").glob("2*") if p != clean]
        ckpts = list(runs[0].glob("candidates/small/checkpoints/step-*")) if runs else []
        if not killed and ckpts and (pid := _rank_pid(1, int(marker))):
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=60)
    assert killed, out
    assert proc.returncode == 0, out
    assert "resumed from" in out
    (faulty,) = [p for p in (tmp_path / "runs" / "tiny").glob("2*") if p != clean]
    a = load_file(clean / "candidates/small/artifact/model.safetensors")
    b = load_file(faulty / "candidates/small/artifact/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    ra = json.loads((clean / "candidates/small/result.json").read_text())
    assert len(ra["peak_mem_bytes_per_rank"]) == 2  # every rank's peak, gathered to rank 0
    rb = json.loads((faulty / "candidates/small/result.json").read_text())
    assert ra["history"]["train_loss"] == rb["history"]["train_loss"]
    # The restarted rank 0 went on with the candidate's MLflow run: one run, not two.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parent = json.loads((faulty / "mlflow.json").read_text())["parent_run_id"]
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              f"tags.mlflow.parentRunId = '{parent}'")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("small", "FINISHED")]
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert steps == set(range(1, 61))  # every step logged, the replayed ones once more


# (ddp: resized mid-epoch by tests/multihost/test_elastic.py)
@pytest.mark.parametrize("strategy", ["fsdp", "zero1"])
def test_resume_on_another_world_size_restores_the_exact_weights(tmp_path, tiny_raw, strategy):
    # zero1 saves its optimizer state whole from rank 0; the others reshard through DCP.
    tiny_raw["train"].update(parallel={"strategy": strategy, "world_size": 2}, epochs=2,
                             restore_best=False)
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]
    out = resume_with_no_more_steps(tmp_path, write_config(tmp_path / "c.yaml", tiny_raw),
                                    "{strategy: single, world_size: 1}", "small", steps=40)
    assert out["strategy"] == "single"
    assert out["world_size"] == 1

