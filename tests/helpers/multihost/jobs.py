"""A small ddp training job for the multi-node tests, and its agents' lifecycle."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.helpers.multihost.engines import node_env
from tests.helpers.multihost.netns import Node, kill_group

CONFIG = {
    "name": "mh", "seed": 0,
    "data": {"source": "sklearn:digits", "loader": {"map_fn": "tests.helpers.slow:sleepy"}},
    "monitor": {"tensorboard": False},
    "train": {"epochs": 2, "batch_size": 64, "checkpoint_every_steps": 5, "restore_best": False,
              "max_restarts": 1,
              "parallel": {"strategy": "ddp", "world_size": 2},
              "candidates": [{"name": "small", "model": {"type": "mlp", "hidden_sizes": [16]}}]},
}
# Every rank one thread, on one machine or two: more threads could split a sum differently.
ENV = {"OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"}  # (and the agents say what they do)


def start_agent(node: Node, argv: list[str], work: Path, log: str, **env: str
                ) -> subprocess.Popen:
    with (work / log).open("a") as out:
        return node.popen(argv, cwd=work, env=node_env(**ENV, **env), stdout=out,
                          stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], work: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            for p in procs:
                kill_group(p)
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}"
                             for f in sorted(work.glob("*.log")))
            raise AssertionError(f"an agent ended with {code}:\n{logs}")
