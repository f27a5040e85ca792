"""A parameter-server worker joining a running job (part of ``bench/elastic.py``).

An async job (1 server + 1 worker, the digits MLP, a fixed cost per row in the loader)
starts; once its servers are up, ``distml ps-worker`` adds a worker. Measured:
``join_to_first_gradient_s`` (the server admitting it to its first gradient applied: what
joining costs the job), ``command_to_first_gradient_s`` (the command started to that
gradient: with Python's and torch's start-up, building the model and reading the data),
the items the joiner completed, and whether every item of every epoch was completed
exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import QUICK

ROOT = Path(__file__).parents[1]
EPOCHS = 2 if QUICK else 4


def config(out: Path) -> dict[str, Any]:
    return {
        "name": "psj", "seed": 0, "output_dir": str(out),
        "data": {"source": "sklearn:digits", "loader": {"map_fn": "bench.elastic:sleepy_rows"}},
        "monitor": {"tensorboard": False},
        "train": {"epochs": EPOCHS, "batch_size": 32, "lr": 0.003, "restore_best": False,
                  "parallel": {"strategy": "parameter_server", "world_size": 2,
                               "parameter_server": {"mode": "async", "batches_per_item": 2}},
                  "candidates": [{"name": "small", "model": {"type": "mlp",
                                                             "hidden_sizes": [64]}}]},
    }


def _start(args: list[str], root: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "distml", *args], cwd=root, env=env,
                            stdout=(root / log).open("a"), stderr=subprocess.STDOUT)


def run(root: Path, timeout: float = 600) -> dict[str, Any]:
    (root / "psj.yaml").write_text(yaml.safe_dump(config(root / "psj")))
    job = _start(["train", "psj.yaml", "--quiet"], root, "psj-job.log")
    deadline = time.monotonic() + timeout
    try:
        while not (found := sorted(root.glob("psj/psj/2*/candidates/small/ps-join.json"))):
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the parameter-server job never served; see {root}")
            time.sleep(0.05)
        folder = found[0].parent
        launched = time.time()
        joiner = _start(["ps-worker", str(folder.parents[1]), "--candidate", "small"], root,
                        "psj-joiner.log")
        job.wait(timeout)
        joiner.wait(60)
    finally:
        for p in (job, *([joiner] if "joiner" in locals() else [])):
            if p.poll() is None:
                p.kill()
    ps = json.loads((folder / "result.json").read_text())["parameter_server"]
    (join,) = [e for e in ps["membership"] if e["event"] == "join"]
    first = join["first_gradient_s"]
    return {
        "join_to_first_gradient_s": first,
        "command_to_first_gradient_s": None if first is None
        else join["time"] + first - launched,
        "joiner_items": sum(a["items_by_worker"].get(str(join["worker"]), 0)
                            for a in ps["accounting"]),
        "every_item_once": all(sorted(i for i, _ in a["completions"])
                               == list(range(a["items"])) for a in ps["accounting"]),
        "exit_codes": [job.returncode, joiner.returncode], "membership": ps["membership"],
        "setup": {"job": "1 server + 1 worker (async), loopback", "epochs": EPOCHS},
    }
