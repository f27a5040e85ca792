"""Parameter-server workers that come and go in one running job: a torchrun job on node-a
(server 0, workers 1 and 2); two workers join it from node-b (``distml ps-worker``), then
one is scaled down (SIGTERM: it finishes its item and says goodbye), one is killed (its
item re-queued) and rank 2 hangs (SIGSTOP: it loses its lease, its item is re-queued, its
keeper kills it). The job goes on, and every item of every epoch is completed exactly
once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distml.workflow.report import parameter_server_lines
from tests.helpers.multihost.engines import BIN, node_env
from tests.helpers.multihost.jobs import ENV, start_agent
from tests.helpers.multihost.netns import Cluster, Node
from tests.helpers.procs import worker_pid

pytestmark = pytest.mark.multihost

CONFIG = {
    "name": "psj", "seed": 0, "monitor": {"tensorboard": False},
    "data": {"source": "sklearn:digits", "loader": {"map_fn": "tests.helpers.slow:paced"}},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.005,
              "parallel": {"strategy": "parameter_server", "world_size": 3,
                           "parameter_server": {"mode": "async", "batches_per_item": 1,
                                                "lease_s": 2.0}},
              "candidates": [{"name": "small", "model": {"type": "mlp", "hidden_sizes": [16]}}]},
}


def _wait_for(what: str, cond, deadline: float, job: subprocess.Popen, log: Path):  # noqa: ANN001
    while time.monotonic() < deadline:
        if (got := cond()) is not None:
            return got
        assert job.poll() is None, f"the job ended before {what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def _join(node: Node, run: Path, cwd: Path, pace: Path) -> subprocess.Popen:
    return node.popen([sys.executable, "-m", "distml", "ps-worker", str(run), "--candidate",
                       "small"], env=node_env(**ENV, DISTML_TEST_PACE=str(pace)), cwd=cwd,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _joined(proc: subprocess.Popen) -> int:
    """The id the joiner printed once admitted (it prints nothing before)."""
    line = proc.stdout.readline()
    assert line.startswith("joined the job as worker "), line + proc.communicate()[0]
    return int(line.split()[-1])


def test_workers_join_from_another_node_leave_die_and_hang(nodes: Cluster, tmp_path: Path):
    a, b = nodes["node-a"], nodes["node-b"]
    pace = tmp_path / "pace"
    pace.write_text("1")  # seconds per batch: the job waits for its joiners to start
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(
        {**CONFIG, "output_dir": str(tmp_path / "runs")}))
    marker, log = str(os.getpid()), tmp_path / "job.log"
    job = start_agent(a, [str(BIN / "torchrun"), "--nnodes", "1", "--nproc-per-node", "3",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{a.addr}:29420",
                          "--rdzv-id", "psj", "-m", "distml.train", "ps.yaml"],
                      tmp_path, log.name, DISTML_TEST_PACE=str(pace),
                      DISTML_TEST_PARENT=marker)
    deadline = time.monotonic() + 240
    join_file = _wait_for("the job's servers", lambda: next(iter(
        tmp_path.glob("runs/psj/2*/candidates/small/ps-join.json")), None), deadline, job, log)
    servers = json.loads(join_file.read_text())["servers"]
    assert servers[0].startswith(f"{a.addr}:"), servers  # the node's address, not loopback
    run = join_file.parents[2]
    joiners = [_join(b, run, tmp_path, pace) for _ in range(2)]
    ids = [_joined(p) for p in joiners]
    pace.write_text("0.05")
    checkpoints = run / "candidates" / "small" / "checkpoints"
    # A whole epoch with four workers (each takes a share of its items); then one joiner
    # leaves cleanly, the other is killed, and rank 2 hangs: it holds its connections but
    # renews no lease. The job finishes with worker 1.
    whole = max(2, len(list(checkpoints.glob("step-*"))) + 2)
    _wait_for("an epoch with four workers", lambda: True if len(
        list(checkpoints.glob("step-*"))) >= whole else None, deadline, job, log)
    os.kill(worker_pid(2, marker), signal.SIGSTOP)
    joiners[0].send_signal(signal.SIGTERM)
    joiners[1].kill()
    left, _ = joiners[0].communicate(timeout=120)
    joiners[1].wait(timeout=60)
    pace.write_text("0")
    assert job.wait(timeout=240) == 0, log.read_text()[-4000:]
    out = log.read_text()
    assert f"worker {ids[0]}:" in left, left
    assert "(left the job)" in left, left
    assert "worker rank 2 lost (no heartbeat for 2 s)" in out
    assert "parameter-server worker rank 2 died (hung: no heartbeat for 4 s" in out

    result = json.loads((run / "candidates" / "small" / "result.json").read_text())
    ps = result["parameter_server"]
    # Fresh ids after the job's ranks (server 0, workers 1 and 2), in the order they came.
    assert sorted(ids) == [3, 4]
    assert sorted(ps["joined_workers"]) == [3, 4]
    assert ps["workers"] == [1, 2, *ps["joined_workers"]]
    assert ps["dead_workers"] == sorted([2, ids[1]])  # the one that left is not dead
    events = [(e["event"], e["worker"]) for e in ps["membership"]]
    assert events[:2] == [("join", w) for w in ps["joined_workers"]]
    assert sorted(events[2:]) == sorted([("leave", ids[0]), ("lost", ids[1]), ("lost", 2)])
    assert ps["membership"][1]["workers_after"] == [1, 2, 3, 4]
    assert ps["membership"][-1]["workers_after"] == [1]
    assert all(e["first_gradient_s"] > 0 for e in ps["membership"][:2])  # both pushed
    done: dict[str, int] = {}
    for epoch in ps["accounting"]:  # every item of every epoch completed exactly once
        assert sorted(i for i, _ in epoch["completions"]) == list(range(epoch["items"]))
        for w, n in epoch["items_by_worker"].items():
            done[w] = done.get(w, 0) + n
    assert [a["epoch"] for a in ps["accounting"]] == [0, 1, 2, 3]
    assert min(done.get("3", 0), done.get("4", 0)) >= 1, done  # the joiners took items
    requeued = {w for a in ps["accounting"] for _, w in a["requeued"]}
    assert 2 in requeued  # the hung worker's item went back
    assert requeued <= {2, ids[1]}  # the dead ones' only: the one that left finished its
    assert not join_file.exists()  # the job takes no one once it is over
    report = "\n".join(parameter_server_lines([result]))
    assert f"| {ids[1]} | lost |" in report, report
