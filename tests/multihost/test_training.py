"""Training across two nodes (one torch agent per node, c10d rendezvous on node-a): ddp ends
with the weights of the same run on one machine, bit for bit, also when a node's agent dies
mid-run and is started again (as Kubernetes restarts a pod)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers.multihost.engines import BIN, node_env
from tests.helpers.multihost.jobs import CONFIG, ENV, start_agent, wait_all
from tests.helpers.multihost.netns import Cluster, Node, kill_group

pytestmark = pytest.mark.multihost


@dataclass
class Work:
    """The folder, the config, and the reference: the same job on one machine (2 ranks),
    run beside the first two-node job (it mostly waits, as they do)."""

    root: Path
    reference: subprocess.Popen

    def assert_same_training(self, name: str) -> None:
        out, _ = self.reference.communicate(timeout=300)
        assert self.reference.returncode == 0, out
        one, two = candidate_dir(self.root / "one"), candidate_dir(self.root / name)
        a = load_file(one / "artifact" / "model.safetensors")
        b = load_file(two / "artifact" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), k
        ra, rb = (json.loads((d / "result.json").read_text()) for d in (one, two))
        assert ra["history"]["train_loss"] == rb["history"]["train_loss"]
        assert rb["world_size"] == 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    root = tmp_path_factory.mktemp("training")
    raw = json.loads(json.dumps(CONFIG))
    (root / "mh.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(root / "one")}))
    reference = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", "mh.yaml", "--quiet"], cwd=root,
        env=node_env(**ENV), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        yield Work(root, reference)
    finally:
        kill_group(reference)
        reference.communicate()


def candidate_dir(output_dir: Path) -> Path:
    (run,) = (output_dir / "mh").glob("2*")
    return run / "candidates" / "small"


def torchrun(a: Node, port: int, job: str, output_dir: Path) -> list[str]:
    return [str(BIN / "torchrun"), "--nnodes", "2",
            "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{a.addr}:{port}", "--rdzv-id", job, "--max-restarts", "1", "-m",
            "distml.train", "mh.yaml", "--set", f"output_dir={output_dir}"]


def test_torchrun_on_two_nodes_trains_what_one_node_trains(nodes: Cluster, work: Work):
    a, b = nodes["node-a"], nodes["node-b"]
    argv = torchrun(a, 29400, "two", work.root / "two")
    agents = [start_agent(n, argv, work.root, f"two-{n.hostname}.log") for n in (a, b)]
    wait_all(agents, work.root)
    work.assert_same_training("two")
    # gloo used the nodes' network: distml pointed it at the interface routing to node-a
    log = (work.root / "two-node-b.log").read_text()
    assert "collectives use eth0 (10.231.0.2)" in log, log[-3000:]


def test_a_killed_node_rejoins_and_the_job_resumes_bit_for_bit(nodes: Cluster, work: Work):
    """distml's own launcher this time: `distml train --rdzv-endpoint` on each node."""
    a, b = nodes["node-a"], nodes["node-b"]
    out = work.root / "killed"
    argv = [sys.executable, "-m", "distml", "train", "mh.yaml", "--set", f"output_dir={out}",
            "--rdzv-endpoint", f"{a.addr}:29401", "--nnodes", "2", "--rdzv-id", "killed",
            # node-b's death is noticed after 3 heartbeats 1 s apart missed (default: 15 s)
            "--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=3"]
    agents = [start_agent(a, argv, work.root, "killed-node-a.log")]
    a.wait_listening(29401)  # (node-b would wait 5 s for it; node-a may load slower)
    agents.append(start_agent(b, argv, work.root, "killed-node-b.log"))
    deadline = time.monotonic() + 180
    while not list(out.glob("mh/2*/candidates/small/checkpoints/step-*")):
        if time.monotonic() > deadline or any(p.poll() is not None for p in agents):
            wait_all(agents, work.root, timeout=1)  # reports the logs
            raise AssertionError("no checkpoint was written")
        time.sleep(0.05)
    os.kill(agents[1].pid, signal.SIGKILL)  # node-b's agent ...
    b.kill_all()  # ... and its ranks with it: the pod is gone
    agents[1].wait(10)
    agents[1] = start_agent(b, argv, work.root, "killed-node-b.log")  # the pod restarted
    wait_all(agents, work.root)
    logs = "".join((work.root / f"killed-{n.hostname}.log").read_text() for n in (a, b))
    assert "resumed from" in logs
    work.assert_same_training("killed")
