"""``distml watch``: a model of concept A is served; files of concept B land; the loop
detects the drift, retrains, promotes, and the server switches with no failed request."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distml.artifact import load_artifact
from distml.registry import Registry
from tests.helpers.cli import distml
from tests.helpers.configs import write_config
from tests.helpers.serving import infer_body, running_server

COLUMNS = ["x1", "x2", "x3"]


def stream(n: int, concept: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SEA-like rows: three uniform features on [0, 10], the third irrelevant; concept A
    labels x1 + x2 <= 10, concept B labels x1 > x2 (they agree on half the plane)."""
    x = np.random.default_rng(seed).uniform(0, 10, size=(n, 3)).astype(np.float32)
    y = x[:, 0] + x[:, 1] <= 10 if concept == "A" else x[:, 0] > x[:, 1]
    return x, y.astype(np.int64)


def land(path: Path, concept: str, seed: int, n: int = 2000) -> Path:
    """Written under a hidden name and renamed in, as a landing file should be."""
    x, y = stream(n, concept, seed)
    tmp = path.with_name("." + path.name)
    pq.write_table(pa.table({**{c: x[:, j] for j, c in enumerate(COLUMNS)}, "label": y}), tmp)
    tmp.rename(path)
    return path


def config(root: Path, source: Path, *, window_files: int = 0, epochs: int = 6) -> Path:
    raw = {
        "name": "stream", "seed": 0, "output_dir": str(root / "runs"),
        "registry": str(root / "registry"), "data": {"source": str(source)},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.02, "candidates": [
            {"name": "narrow", "model": {"type": "mlp", "hidden_sizes": [16]}},
            {"name": "wide", "model": {"type": "mlp", "hidden_sizes": [32]}}]},
        "monitor": {"tensorboard": False, "system_metrics_interval_s": None,
                    "watch": {"window_files": window_files}},
    }
    return write_config(root / "stream.yaml", raw)


def served_accuracy(url: str, x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    r = httpx.post(f"{url}/v2/models/stream/infer", json=infer_body(x), timeout=30)
    assert r.status_code == 200, r.text
    label = next(o["data"] for o in r.json()["outputs"] if o["name"] == "label")
    return float(np.mean(np.asarray(label) == y.astype(str))), r.json()["model_version"]


def clients(url: str, x: np.ndarray, stop: threading.Event, results: list) -> list:
    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            k = i
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/v2/models/stream/infer", json=infer_body(x[k % 500:][:4]))
                    results.append((r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as e:
                    results.append((type(e).__name__, str(e)))
                k += 7
                time.sleep(0.02)  # steady traffic that leaves the 2 cores to the training

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    return threads


def watch(cfg: Path, landing: Path, env: dict | None = None, check: bool = True):
    """``distml watch CONFIG --landing DIR --once`` (wide lines: messages are not wrapped)."""
    return distml("watch", str(cfg), "--landing", str(landing), "--once", cwd=cfg.parent,
                  env={"COLUMNS": "300", **(env or {})}, check=check)


def _state(cfg_root: Path) -> dict:
    return json.loads((cfg_root / "runs" / "stream" / "watch" / "state.json").read_text())


def test_the_loop_detects_drift_retrains_promotes_and_the_server_switches(tmp_path):
    (tmp_path / "initial").mkdir()
    land(tmp_path / "initial" / "a0.parquet", "A", seed=0)
    cfg = config(tmp_path, tmp_path / "initial")
    distml("run", str(cfg), "-q", cwd=tmp_path)
    holdout_x, holdout_y = stream(2000, "B", seed=99)
    landing = tmp_path / "landing"
    landing.mkdir()
    with running_server("stream@production", "--registry", str(tmp_path / "registry"),
                        "--reload-interval", "0.5", cwd=tmp_path) as (url, _, _):
        before, version = served_accuracy(url, holdout_x, holdout_y)
        assert version == "1"
        assert before < 0.8  # concept A's model on concept B
        land(landing / "b1.parquet", "B", seed=1)
        results: list = []
        stop = threading.Event()
        threads = clients(url, holdout_x, stop, results)
        try:
            out = watch(cfg, landing).stdout
            deadline = time.monotonic() + 15
            while not any(r[1] == "2" for r in results) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        after, version = served_accuracy(url, holdout_x, holdout_y)
    assert "cycle 1" in out
    assert "promoted stream:2 to production" in out, out
    assert not [r for r in results if r[0] != 200], [r for r in results if r[0] != 200][:3]
    assert {r[1] for r in results} == {"1", "2"}
    assert version == "2"
    # The same config trained on the new file directly.
    (tmp_path / "direct").mkdir()
    distml("run", str(config(tmp_path / "direct", landing / "b1.parquet")), "-q",
           cwd=tmp_path)
    direct = load_artifact(tmp_path / "direct" / "registry" / "stream" / "v1")
    direct_accuracy = float(np.mean(direct.predict(holdout_x).argmax(1) == holdout_y))
    assert after >= direct_accuracy - 0.02, (after, direct_accuracy)
    state = _state(tmp_path)
    assert state["processed"] == ["b1.parquet"]
    assert state["cycle"] is None
    cycle = state["cycles"][0]
    assert cycle["drift"]["concept_drift"] is True
    assert cycle["newest_test"]["new"] > cycle["newest_test"]["production"]
    audit = Registry(tmp_path / "registry").audit("stream")[-1]
    assert audit["to_version"] == 2
    assert "distml watch cycle 1" in audit["reason"]

    # Nothing new: nothing done.
    out = watch(cfg, landing).stdout
    assert "nothing new to process" in out
    assert _state(tmp_path) == state
    # More of concept B: no drift from the new production, no retraining.
    land(landing / "b2.parquet", "B", seed=2)
    out = watch(cfg, landing).stdout
    assert "no drift: production kept" in out, out
    assert [v.version for v in Registry(tmp_path / "registry").versions("stream")] == [1, 2]
    assert _state(tmp_path)["processed"] == ["b1.parquet", "b2.parquet"]


def _killed_when(cfg: Path, landing: Path, ready: Callable[[], bool]) -> str:
    """Start ``distml watch --once`` and SIGKILL it, from outside, the moment ``ready()``
    holds: nothing in the process knows it is coming (fails if it ends first). Returns
    what it printed."""
    log = cfg.parent / f"killed-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distml", "watch", str(cfg), "--landing", str(landing),
             "--once"], cwd=cfg.parent, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "300"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, "distml watch ended before the state to crash in"
            assert time.monotonic() < deadline, "the state to crash in never came"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_a_cycle_killed_mid_training_and_after_registering_resumes_in_its_run(tmp_path):
    (tmp_path / "initial").mkdir()
    a0 = land(tmp_path / "initial" / "a0.parquet", "A", seed=0, n=600)
    cfg = config(tmp_path, tmp_path / "initial", window_files=1, epochs=40)
    landing = tmp_path / "landing"
    landing.mkdir()
    land(landing / "b1.parquet", "B", seed=1, n=600)
    missing = distml("watch", str(cfg), "--once", cwd=tmp_path, check=False)
    assert missing.returncode == 2
    assert "give the landing folder: --landing DIR or monitor.watch.landing" in missing.stderr
    runs = tmp_path / "runs" / "stream"
    registry = Registry(tmp_path / "registry")

    # Killed while the first candidate trains: it has a checkpoint, no result.
    narrow = "2*/candidates/narrow"
    _killed_when(cfg, landing, lambda: any(runs.glob(f"{narrow}/checkpoints/step-*")))
    cycle = _state(tmp_path)["cycle"]
    assert cycle["step"] == "training"
    assert cycle["window"] == [str(a0)]  # the source's file, the window of 1 older file
    assert not list(runs.glob(f"{narrow}/result.json"))
    # Killed again once its version is registered (in the report that follows, before the
    # state says so); this run goes on from the first one's checkpoint.
    out = _killed_when(cfg, landing, lambda: (tmp_path / "registry" / "stream" / "v1").is_dir())
    step = re.search(r"resumed from \S*/candidates/narrow/checkpoints/\S+ \(step (\d+)\)", out)
    assert step is not None, out
    assert int(step[1]) > 0
    resumed = json.loads(next(runs.glob(f"{narrow}/result.json")).read_text())
    first_eval = resumed["history"]["evals"][0]["step"]
    assert resumed["steps"] == 40 * first_eval  # all 40 epochs, an evaluation per epoch

    done = watch(cfg, landing)
    (finished,) = _state(tmp_path)["cycles"]
    assert finished["drift"]["why"] == "no stream@production in the registry yet"
    assert finished["outcome"] == "promoted stream:1 to production"
    assert [p for p in runs.glob("2*") if p.is_dir()] == [Path(cycle["run_dir"])]
    assert (Path(cycle["run_dir"]) / "summary.json").is_file()
    assert [v.version for v in registry.versions("stream")] == [1]
    assert [e["version"] for e in registry.audit("stream") if e["event"] == "register"] == [1]
    assert "already trained; reusing its result" in done.stderr + done.stdout
    data = sorted(p.name for p in (Path(cycle["run_dir"]) / "data").resolve().parent.glob(
        "data-*"))
    assert len(data) == 1  # ingested once
    links = sorted(p.name for p in (tmp_path / "runs" / "stream" / "watch" / "cycles" / "0001"
                                    / "data").iterdir())
    assert links == ["0000-b1.parquet", "0001-a0.parquet"]  # the new file first


def test_a_large_file_of_unchanged_data_is_not_retrained_on(tmp_path):
    (tmp_path / "initial").mkdir()
    # a large training set: the reference's sample is what the tests need, whatever its size
    land(tmp_path / "initial" / "a0.parquet", "A", seed=0, n=50_000)
    cfg = config(tmp_path, tmp_path / "initial", epochs=1)
    distml("run", str(cfg), "-q", cwd=tmp_path)
    landing = tmp_path / "landing"
    landing.mkdir()
    land(landing / "a1.parquet", "A", seed=1, n=200_000)
    out = watch(cfg, landing).stdout
    assert "no drift: production kept" in out, out
    (cycle,) = _state(tmp_path)["cycles"]
    assert cycle["drift"]["drifted_features"] == []
    assert cycle["drift"]["concept_drift"] is False
    assert [v.version for v in Registry(tmp_path / "registry").versions("stream")] == [1]
