"""The parameter server on real processes (on CPU): a SIGKILLed worker and a SIGKILLed
server, a worker that raises, ssp's bound under a straggler, sync with backup workers and
two servers, and verify's certificate for sync. (A hung worker: test_ps_join.py, in the job
that workers join and leave.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.cli import distml
from tests.helpers.configs import write_config
from tests.helpers.distributed import ENV
from tests.helpers.procs import worker_pid


def _ps_config(tmp_path: Path, raw: dict, *, world: int, epochs: int,
               more: tuple[dict, ...] = (), **ps) -> Path:
    """The small mlp (and ``more`` candidates) under parameter servers."""
    raw["train"].update(epochs=epochs, batch_size=64, lr=0.005, restore_best=True,
                        parallel={"strategy": "parameter_server", "world_size": world,
                                  "parameter_server": ps})
    raw["train"]["candidates"] = [raw["train"]["candidates"][0], *more]
    raw["monitor"] = {"tensorboard": False}
    return write_config(tmp_path / "ps.yaml", raw)


def _result(tmp_path: Path, run: Path | None = None, candidate: str = "small") -> dict:
    runs = [run] if run else sorted((tmp_path / "runs" / "tiny").glob("2*"))
    return json.loads((runs[-1] / "candidates" / candidate / "result.json").read_text())


def _checkpoints(tmp_path: Path, clean: Path | None) -> list[Path]:
    runs = [p for p in (tmp_path / "runs" / "tiny").glob("2*") if p != clean]
    return sorted(runs[0].glob("candidates/small/checkpoints/step-*")) if runs else []


def test_killed_worker_and_server_under_async(tmp_path, tiny_raw):
    tiny_raw["data"] = {"source": "sklearn:digits",
                        "loader": {"map_fn": "tests.helpers.slow:sleepier"}}
    tiny_raw["train"].update(max_restarts=1, keep_checkpoints=10)
    # Wide enough to reach its plateau in 5 epochs: the accuracy compared is not noise.
    tiny_raw["train"]["candidates"][0]["model"]["hidden_sizes"] = [64]
    cfg = _ps_config(tmp_path, tiny_raw, world=3, epochs=5, mode="async")
    distml("train", str(cfg), cwd=tmp_path, env=ENV)  # undisturbed
    (clean,) = (tmp_path / "runs" / "tiny").glob("2*")
    undisturbed = _result(tmp_path, clean)

    marker = str(os.getpid())
    proc = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", str(cfg)], cwd=tmp_path,
        env={**os.environ, **ENV, "DISTML_TEST_PARENT": marker},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The worker rank 2 after the first epoch's checkpoint (mid-epoch 1); server rank 0
    # after the third (mid-epoch 3): the attempt dies, and the restart resumes from it.
    plan = [(1, 2), (3, 0)]
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and plan:
        epochs, rank = plan[0]
        if len(_checkpoints(tmp_path, clean)) >= epochs and (pid := worker_pid(rank, marker)):
            time.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            plan.pop(0)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=240)
    assert not plan, out
    assert proc.returncode == 0, out
    assert "parameter-server worker rank 2 died (signal SIGKILL); the job goes on" in out
    assert "worker rank 2 lost" in out
    assert "resumed from" in out
    result = _result(tmp_path)
    ps = result["parameter_server"]
    accounting = ps["accounting"]
    assert [a["epoch"] for a in accounting] == list(range(5))
    for epoch in accounting:  # every item of every epoch completed exactly once
        items = sorted(i for i, _ in epoch["completions"])
        assert items == list(range(epoch["items"])), epoch
    killed = accounting[1]
    assert [w for _, w in killed["requeued"]] == [2]  # its unfinished item went back
    item = killed["requeued"][0][0]
    assert killed["attempts"][str(item)] == 2
    assert [w for i, w in killed["completions"] if i == item] == [1]
    assert killed["items_by_worker"]["1"] > killed["items_by_worker"].get("2", 0)
    assert abs(result["val"]["accuracy"] - undisturbed["val"]["accuracy"]) <= 0.01


def test_ssp_never_exceeds_its_bound_under_a_straggler(tmp_path, tiny_raw):
    free = {"name": "free", "model": {"type": "mlp", "hidden_sizes": [16]},
            "parallel": {"parameter_server": {"mode": "async"}}}
    # Worker rank 2 sleeps 10x its compute time (at least 50 ms) after every batch (both
    # candidates).
    cfg = _ps_config(tmp_path, tiny_raw, world=3, epochs=2, more=(free,), mode="ssp",
                     staleness=1, worker="tests.helpers.straggler:Straggler")
    distml("train", str(cfg), cwd=tmp_path, env=ENV)
    ssp = _result(tmp_path)["parameter_server"]
    leads = ssp["updates"]["lead"]
    assert len(leads) == _result(tmp_path)["steps"]  # one per applied gradient
    assert max(leads) == 1  # reached, never exceeded
    assert ssp["staleness_bound"] == 1
    free = _result(tmp_path, candidate="free")["parameter_server"]
    assert max(free["updates"]["lead"]) > 3  # without the bound, the fast worker runs ahead
    slow, fast = free["per_worker"]["2"], free["per_worker"]["1"]
    assert slow["straggle_s"] > 0
    assert fast["batches"] > 2 * slow["batches"]  # the straggler holds nobody back


def test_sync_is_certified_by_verify_and_async_is_not_pretended(tmp_path, tiny_raw):
    cfg = _ps_config(tmp_path, tiny_raw, world=3, epochs=1, mode="async")
    out = tmp_path / "verify.json"
    # Two servers (the parameters sharded across them) and one worker.
    distml("verify", str(cfg), "--strategies", "ps-sync", "--tolerance", "1e-5",
           "--json", str(out), cwd=tmp_path, env=ENV)
    (r,) = json.loads(out.read_text())["results"]
    assert r["passed"]
    assert r["max_rel_loss_diff"] <= 1e-5
    assert r["max_rel_param_diff"] <= 1e-5
    servers, worker = r["state_bytes_per_rank"][:2], r["state_bytes_per_rank"][2]
    assert worker["optimizer"] == 0  # workers compute gradients only
    assert sum(s["params"] for s in servers) == worker["params"]
    refused = distml("verify", str(cfg), "--strategies", "ps-async", cwd=tmp_path,
                     env=ENV, check=False)
    assert refused.returncode != 0
    assert "ps-async: not deterministic" in refused.stdout + refused.stderr


def test_a_worker_that_raises_fails_the_job_with_its_error(tmp_path, tiny_raw):
    cfg = _ps_config(tmp_path, tiny_raw, world=3, epochs=2, mode="async",
                     worker="tests.helpers.straggler:Raiser")
    proc = distml("train", str(cfg), cwd=tmp_path, env=ENV, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "worker rank 2: a bad batch (injected)" in out
    assert "the job goes on without it" not in out


def test_sync_with_backup_workers_applies_each_batch_once_on_every_shard(tmp_path, tiny_raw):
    # Two servers, three workers (ranks 2-4); rank 2 a straggler, so usually the backup.
    cfg = _ps_config(tmp_path, tiny_raw, world=5, epochs=2, mode="sync", num_servers=2,
                     backup_workers=1, worker="tests.helpers.straggler:Straggler")
    tiny_raw["train"]["batch_size"] = 48  # 16 rows per worker
    cfg = write_config(cfg, tiny_raw)
    distml("train", str(cfg), cwd=tmp_path, env=ENV)
    ps = _result(tmp_path)["parameter_server"]
    assert ps["dropped_gradients"] > 0
    assert ps["step_workers_agree_across_shards"] is True
    for epoch in ps["accounting"]:
        assert sorted(i for i, _ in epoch["completions"]) == list(range(epoch["items"]))
        assert epoch["dropped"], epoch  # items handed back from a dropped batch on
        batches = epoch["batches"]  # every batch applied, and once
        assert batches["applied"] == batches["distinct"] == batches["expected"], batches
