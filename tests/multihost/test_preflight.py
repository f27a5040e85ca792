"""Preflight: a misconfigured node fails within seconds, naming the fix, instead of hanging."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.multihost.engines import node_env
from tests.helpers.multihost.jobs import CONFIG
from tests.helpers.multihost.netns import Cluster, Node

pytestmark = pytest.mark.multihost


@pytest.fixture
def config(tmp_path: Path) -> Path:
    raw = json.loads(json.dumps(CONFIG))
    raw["data"].pop("loader")
    path = tmp_path / "mh.yaml"
    path.write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / "runs")}))
    return path


def fails_fast(node: Node, argv: list[str], cwd: Path, **env: str) -> str:
    """Runs ``argv`` on ``node``; it must exit 2 within 10 s. Returns its output."""
    start = time.monotonic()
    proc = node.run(argv, cwd=cwd, env=node_env(**env), timeout=60)
    seconds = time.monotonic() - start
    out = " ".join((proc.stdout + proc.stderr).split())  # (rich wraps long lines)
    assert proc.returncode == 2, out[-3000:]
    assert seconds < 10, f"took {seconds:.1f} s: {out[-2000:]}"
    assert "Traceback" not in out
    return out


def train_on_nodes(config: Path, a: Node, port: int) -> list[str]:
    return [sys.executable, "-m", "distml", "train", str(config), "--rdzv-endpoint",
            f"{a.addr}:{port}", "--nnodes", "2"]


def test_a_hostname_resolving_to_loopback_fails_naming_the_fix(nodes: Cluster, config: Path):
    a = nodes["node-a"]
    nodes.write_hosts({"node-a": "127.0.1.1"})  # as Debian's installer writes it
    out = fails_fast(a, train_on_nodes(config, a, 29420), config.parent)
    assert "hostname 'node-a' resolves to 127.0.1.1 (loopback)" in out
    assert "replace '127.0.1.1 node-a' with '10.231.0.1 node-a'" in out


def test_a_closed_rendezvous_port_fails_naming_the_fix(nodes: Cluster, config: Path):
    a, b = nodes["node-a"], nodes["node-b"]  # node-a runs nothing: its port is closed
    out = fails_fast(b, train_on_nodes(config, a, 29421), config.parent)
    assert ("nothing listens on the rendezvous endpoint (--rdzv-endpoint) 10.231.0.1:29421, "
            "as seen from this node (10.231.0.2)") in out
    assert "start node 0 (at 10.231.0.1) first" in out


def test_a_rank_started_without_an_agent_fails_on_a_closed_master_port(nodes: Cluster,
                                                                       config: Path):
    """As a PyTorchJob starts it: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and the
    command (torch's store would wait 10 minutes for the master)."""
    a, b = nodes["node-a"], nodes["node-b"]
    out = fails_fast(b, [sys.executable, "-m", "distml.train", str(config)], config.parent,
                     RANK="1", WORLD_SIZE="2", MASTER_ADDR=a.addr, MASTER_PORT="29422")
    assert "nothing listens on the master (MASTER_ADDR:MASTER_PORT) 10.231.0.1:29422" in out


def test_an_output_folder_other_nodes_do_not_see_fails_naming_the_fix(nodes: Cluster,
                                                                      config: Path):
    """Two ranks started by hand (no agent: cheaper), node-b's with a private, empty file
    system mounted over the output folder."""
    a, b = nodes["node-a"], nodes["node-b"]
    runs = config.parent / "runs"
    runs.mkdir()
    argv = [sys.executable, "-m", "distml.train", str(config)]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": a.addr, "MASTER_PORT": "29423"}
    ranks = [a.popen(argv, cwd=config.parent, env=node_env(RANK="0", **env),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    a.wait_listening(29423)  # rank 0 serves the store
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs none "$0" && exec "$@"', str(runs)]
    # (node-b's rank looks for rank 0's file for a second only: this is a test)
    ranks.append(b.popen([*private, *argv], cwd=config.parent,
                         env=node_env(RANK="1", DISTML_PREFLIGHT_WAIT="1", **env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank in ranks:
        out = " ".join(rank.communicate(timeout=120)[0].split())
        assert rank.returncode == 2, out[-3000:]
        assert (f"the output folder {runs} is not shared: rank 1 on node-b cannot see the "
                "file that rank 0 wrote there") in out, out[-3000:]
        assert "every node mounts at the same path" in out
