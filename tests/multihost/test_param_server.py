"""A parameter server across two nodes: the server (with a click model's embedding tables)
on one, the worker on the other, its rows fetched and pushed over the nodes' network; sync
with one worker ends with the weights of the same job on one machine, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers.multihost.engines import BIN, node_env
from tests.helpers.multihost.jobs import ENV, start_agent, wait_all
from tests.helpers.multihost.netns import Cluster

pytestmark = pytest.mark.multihost

CARDS = [2000, 100]
CONFIG = {
    "name": "ps", "seed": 0, "monitor": {"tensorboard": False},
    "data": {"source": {"type": "synthetic:clicks", "n_samples": 1000, "cardinalities": CARDS,
                        "num_dense": 2},
             "transforms": ["standardize",
                            {"type": "hash", "columns": ["c0", "c1"], "buckets": CARDS}]},
    "train": {"epochs": 1, "batch_size": 50, "lr": 0.01,
              "parallel": {"strategy": "parameter_server", "world_size": 2,
                           "parameter_server": {"num_servers": 1, "mode": "sync",
                                                "table_lr": 0.1}},
              "candidates": [{"name": "click", "model": {"type": "click",
                                                         "cardinalities": CARDS, "dim": 4,
                                                         "hidden_sizes": [8]}}]},
}


def _artifact(output_dir: Path) -> dict:
    (run,) = (output_dir / "ps").glob("2*")
    return load_file(run / "candidates" / "click" / "artifact" / "model.safetensors")


def test_sparse_tables_on_a_server_of_another_node(nodes: Cluster, tmp_path: Path):
    a, b = nodes["node-a"], nodes["node-b"]
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(CONFIG))))
    one = subprocess.run(
        [sys.executable, "-m", "distml", "train", "ps.yaml", "--quiet", "--set",
         f"output_dir={tmp_path / 'one'}"], cwd=tmp_path, env=node_env(**ENV),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:]
    argv = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{a.addr}:29410", "--rdzv-id", "ps",
            "-m", "distml.train", "ps.yaml", "--set", f"output_dir={tmp_path / 'two'}"]
    agents = [start_agent(n, argv, tmp_path, f"ps-{n.hostname}.log") for n in (a, b)]
    wait_all(agents, tmp_path)
    ref, got = _artifact(tmp_path / "one"), _artifact(tmp_path / "two")
    assert ref.keys() == got.keys()
    assert {"bags.0.weight", "bags.1.weight"} <= set(got)
    for k in ref:
        assert (ref[k] == got[k]).all(), k
    log = (tmp_path / "ps-node-b.log").read_text()
    assert "collectives use eth0 (10.231.0.2)" in log, log[-3000:]
