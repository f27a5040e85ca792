"""Workers that join a running parameter-server job (``distml ps-worker``) and leave it:
one scaled down (SIGTERM: it finishes its item and says goodbye), one killed (its item
re-queued); the job goes on and every item of every epoch is completed exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from distml.workflow.report import parameter_server_lines
from tests.helpers.configs import write_config
from tests.helpers.distributed import ENV


def _start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distml", *args], cwd=cwd,
                            env={**os.environ, **ENV, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(what: str, cond, deadline: float, proc: subprocess.Popen):  # noqa: ANN001
    while time.time() < deadline:
        if (got := cond()) is not None:
            return got
        assert proc.poll() is None, f"the job ended before {what}: {proc.communicate()[0]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _joined(proc: subprocess.Popen) -> int:
    """The id the joiner printed once admitted (it prints nothing before)."""
    line = proc.stdout.readline()
    assert line.startswith("joined the job as worker "), line + proc.communicate()[0]
    return int(line.split()[-1])


def test_workers_join_a_running_job_take_items_and_leave(tmp_path, tiny_raw):
    pace = tmp_path / "pace"
    pace.write_text("1")  # seconds per batch: the job waits for its joiners to start
    tiny_raw["data"] = {"source": "sklearn:digits",
                        "loader": {"map_fn": "tests.helpers.slow:paced"}}
    tiny_raw["train"].update(epochs=4, batch_size=64, parallel={
        "strategy": "parameter_server", "world_size": 2,
        "parameter_server": {"mode": "ssp", "staleness": 2, "batches_per_item": 1}})
    tiny_raw["train"]["candidates"] = tiny_raw["train"]["candidates"][:1]
    tiny_raw["monitor"] = {"tensorboard": False}
    cfg = write_config(tmp_path / "ps.yaml", tiny_raw)
    env = {"DISTML_TEST_PACE": str(pace)}
    job = _start(["train", str(cfg)], tmp_path, env)
    deadline = time.time() + 240
    join_file = _wait_for("the job's servers", lambda: next(
        iter((tmp_path / "runs" / "tiny").glob("2*/candidates/small/ps-join.json")), None),
        deadline, job)
    run = join_file.parents[2]
    joiners = [_start(["ps-worker", str(run), "--candidate", "small"], tmp_path, env)
               for _ in range(2)]
    ids = [_joined(p) for p in joiners]
    pace.write_text("0.05")
    checkpoints = run / "candidates" / "small" / "checkpoints"
    # A whole epoch with three workers (each takes a share of its 20 items), then one
    # leaves cleanly and one is killed; the job finishes at full speed with the original.
    whole = max(2, len(list(checkpoints.glob("step-*"))) + 2)
    _wait_for("an epoch with three workers", lambda: True if len(
        list(checkpoints.glob("step-*"))) >= whole else None, deadline, job)
    joiners[0].send_signal(signal.SIGTERM)
    joiners[1].kill()
    left, _ = joiners[0].communicate(timeout=120)
    joiners[1].wait(timeout=60)
    pace.write_text("0")
    out, _ = job.communicate(timeout=240)
    assert job.returncode == 0, out
    assert f"worker {ids[0]}:" in left, left
    assert "(left the job)" in left, left

    result = json.loads((run / "candidates" / "small" / "result.json").read_text())
    ps = result["parameter_server"]
    # Fresh ids after the job's ranks (server 0, worker 1), in the order they came.
    assert sorted(ids) == [2, 3]
    assert sorted(ps["joined_workers"]) == [2, 3]
    assert ps["workers"] == [1, *ps["joined_workers"]]
    assert ps["dead_workers"] == [ids[1]]  # the killed one; the one that left is not dead
    events = [(e["event"], e["worker"]) for e in ps["membership"]]
    assert events[:2] == [("join", w) for w in ps["joined_workers"]]
    assert sorted(events[2:]) == sorted([("leave", ids[0]), ("lost", ids[1])])
    assert ps["membership"][1]["workers_after"] == [1, 2, 3]
    assert ps["membership"][-1]["workers_after"] == [1]
    done: dict[str, int] = {}
    for epoch in ps["accounting"]:  # every item of every epoch completed exactly once
        assert sorted(i for i, _ in epoch["completions"]) == list(range(epoch["items"]))
        for w, n in epoch["items_by_worker"].items():
            done[w] = done.get(w, 0) + n
    assert [a["epoch"] for a in ps["accounting"]] == [0, 1, 2, 3]
    assert min(done.get("2", 0), done.get("3", 0)) >= 1, done  # the joiners took items
    assert ps["per_worker"][str(ids[0])]["batches"] >= 1
    assert not join_file.exists()  # the job takes no one once it is over
    report = "\n".join(parameter_server_lines([result]))
    assert f"| {ids[1]} | lost |" in report, report
