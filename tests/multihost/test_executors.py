"""Dask and Ray clusters across two nodes: batch inference and ingestion write what the local
executor writes, byte for byte, also when a worker node dies in the middle of ingestion."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from distml.artifact import read_spec
from distml.config import load_config
from distml.serving.predict import predict
from distml.trust import TrustPolicy
from distml.workflow.pipeline import stage_ingest, stage_train, start_run
from tests.helpers.multihost.engines import dask_cluster, node_env, ray_cluster
from tests.helpers.multihost.netns import Cluster, Node, kill_group

pytestmark = pytest.mark.multihost

# A transform that leaves its columns as they are, but leaves a mark per call (the node's
# hostname, the worker's pid) and sleeps, so that a worker can be killed while it holds an
# item. The folder for the marks and the delay are read from the file "control" next to it
# (the workers are already running: a setting cannot reach them through the environment).
TRANSFORM = '''
import hashlib, os, socket, time
from pathlib import Path

CONTROL = Path(__file__).with_name("control")

def transform(cols):
    if CONTROL.is_file():
        folder, delay = CONTROL.read_text().split()
        first = next(iter(cols.values()))
        key = hashlib.sha256(first.tobytes()).hexdigest()[:8]
        stem = Path(folder) / f"{key}.{socket.gethostname()}.{os.getpid()}.{time.time_ns()}"
        stem.with_suffix(".start").touch()
        time.sleep(float(delay))
        stem.with_suffix(".done").touch()
    return cols
'''

DATA = {"source": {"type": "synthetic:classification", "n_samples": 6000, "n_features": 5,
                   "n_classes": 3, "seed": 3}, "rows_per_partition": 1000}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A config, a model trained with it, and what the local executor writes for both."""
    root = tmp_path_factory.mktemp("executors")
    (root / "marking.py").write_text(TRANSFORM)
    raw = {"name": "mh", "seed": 0, "output_dir": str(root / "local"),
           "registry": str(root / "registry"),
           "data": {**DATA, "transforms": [f"{root / 'marking.py'}:transform", "standardize"]},
           "execution": {"num_workers": 2},
           "monitor": {"tensorboard": False},
           "train": {"epochs": 1, "batch_size": 64, "candidates": [
               {"name": "small", "model": {"type": "mlp", "hidden_sizes": [8]}}]}}
    (root / "mh.yaml").write_text(yaml.safe_dump(raw))
    run = start_run(load_config(root / "mh.yaml"))
    stage_train(run, stage_ingest(run))
    (root / "artifact").symlink_to(run.folder.candidate("small").artifact)
    # Input for batch inference: the model's raw columns in four row groups (work items).
    rng = np.random.default_rng(0)
    columns = read_spec(root / "artifact")["input_columns"]
    pq.write_table(pa.table({c: rng.normal(size=2000) for c in columns}),
                   root / "input.parquet", row_group_size=500)
    # One worker, in this process: forking it after training could copy a lock held by
    # one of torch's (OpenMP) threads.
    predict(str(root / "artifact"), root / "input.parquet", root / "local.parquet",
            registry=root / "registry", num_workers=1,
            trust=TrustPolicy(modules=(str(root / "marking.py"),)))  # the test's own code
    return root


def distml_on(node: Node, args: list[str], *, cwd: Path) -> subprocess.Popen:
    return node.popen([sys.executable, "-m", "distml", *args], cwd=cwd, env=node_env(),
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def marking(work: Path, name: str, delay: float) -> Path:
    """From now on, the transform's calls leave marks in a new folder and take ``delay``."""
    folder = work / f"marks-{name}"
    folder.mkdir()
    (work / "control").write_text(f"{folder} {delay}")
    return folder


def marks(folder: Path) -> list[tuple[str, str]]:
    """(hostname, stem) of every transform call that started."""
    return [(m.group(1), p.stem) for p in folder.glob("*.start")
            if (m := re.match(r"[0-9a-f]{8}\.(node-[ab])\.", p.name))]


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def ingested(output_dir: Path) -> Path:
    (root,) = (output_dir / "mh").glob("data-*")
    return root


def check_predict(work: Path, driver: Node, executor: str) -> None:
    """Batch inference on the cluster, both nodes taking items, writes the local file."""
    name = executor.split(":")[0]
    folder = marking(work, f"predict-{name}", delay=0.2)
    out = work / f"predict-{name}.parquet"
    finish(distml_on(driver, ["predict", "artifact", "--input", "input.parquet", "--output",
                              str(out), "--executor", executor, "--quiet", "--trust-module",
                              str(work / "marking.py")], cwd=work))
    assert {host for host, _ in marks(folder)} == {"node-a", "node-b"}
    assert out.read_bytes() == (work / "local.parquet").read_bytes()


def check_ingest_with_a_kill(work: Path, driver: Node, executor: str,
                             kill: Callable[[], None]) -> None:
    """Ingest while node-b's worker is killed holding an item; the output must not change."""
    name = executor.split(":")[0]
    folder = marking(work, f"ingest-{name}", delay=0.2)
    proc = distml_on(driver, [
        "ingest", "mh.yaml", "--quiet", "--set", f"output_dir={work / name}",
        "--set", f"execution.executor={executor}", "--set", "execution.retries=2"], cwd=work)
    deadline = time.monotonic() + 90
    while not any(host == "node-b" for host, _ in marks(folder)):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"node-b took no item:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    kill()
    finish(proc)
    interrupted = [stem for host, stem in marks(folder)
                   if host == "node-b" and not (folder / f"{stem}.done").exists()]
    assert interrupted, "the worker was killed while it held no item"
    reference = files_digest(ingested(work / "local"))
    assert len(reference) >= 6 * 2  # six partitions, each split two or three ways
    assert files_digest(ingested(work / name)) == reference


def check_search(work: Path, driver: Node, executor: str) -> None:
    """A search's trials run on both nodes, two at a time; the best is selected."""
    raw = yaml.safe_load((work / "mh.yaml").read_text())
    raw["data"]["transforms"] = ["standardize"]
    raw["output_dir"] = str(work / "search")
    raw["execution"] = {"executor": executor}
    raw["train"].update(epochs=3)
    raw["train"]["candidates"][0]["search"] = {
        "space": {"lr": {"loguniform": [1e-3, 0.05]},
                  "model.hidden_sizes": {"choice": [[8], [16]]}},
        "num_trials": 6, "max_concurrent_trials": 2, "sampler": "random", "pruner": "none"}
    (work / "search.yaml").write_text(yaml.safe_dump(raw))
    finish(distml_on(driver, ["run", "search.yaml", "--quiet"], cwd=work))
    (summary,) = (work / "search" / "mh").glob("2*/summary.json")
    summary = yaml.safe_load(summary.read_text())  # JSON is YAML
    trials = summary["search"]["small"]["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 6
    assert {t["host"] for t in trials} == {"node-a", "node-b"}
    assert summary["selected"] == "small"


def test_dask_scheduler_and_workers_on_two_nodes(nodes: Cluster, work: Path):
    a, b = nodes["node-a"], nodes["node-b"]
    with dask_cluster(a, [a, b], work / "dask-logs") as dask:
        executor = f"dask://{dask.address}"
        check_predict(work, a, executor)
        check_search(work, a, executor)
        check_ingest_with_a_kill(work, a, executor, dask.workers["node-b"].kill)


def test_ray_head_and_worker_node_on_two_nodes(nodes: Cluster, work: Path):
    a, b = nodes["node-a"], nodes["node-b"]
    with ray_cluster(a, [b], work / "ray-logs") as ray:
        executor = f"ray://{ray.address}"
        check_predict(work, b, executor)
        # node-b dies whole (its raylet and workers), as when a machine goes away
        check_ingest_with_a_kill(work, a, executor, b.kill_all)
