"""A click model through ``distml train`` under parameter servers (gloo on CPU): the
synthetic click log ingested with its categorical columns hashed, the tables on two row
servers, a server SIGKILLed mid-run that restarts with its rows (sync: bit for bit the
undisturbed run), and the exported artifact holding every table, served from raw values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from distml.artifact import load_artifact
from distml.data.sources.clicks import click_rows
from distml.distributed.param_server.checkpoint import complete, load_rows
from distml.distributed.param_server.sparse import init_rows
from tests.helpers.cli import distml
from tests.helpers.configs import write_config
from tests.helpers.distributed import ENV
from tests.helpers.procs import training_ranks

CARDS, DENSE, SCALE = [3000, 200], 3, 0.05


def _config(root: Path, raw: dict) -> Path:
    root.mkdir()
    raw.update(output_dir=str(root / "runs"), monitor={"tensorboard": False})
    raw["data"] = {"source": {"type": "synthetic:clicks", "n_samples": 1600,
                              "cardinalities": CARDS, "num_dense": DENSE},
                   "transforms": ["standardize",
                                  {"type": "hash", "columns": ["c0", "c1"], "buckets": CARDS}],
                   "rows_per_partition": 500,
                   "loader": {"map_fn": "tests.helpers.slow:sleepier"}}
    raw["train"].update(
        epochs=2, batch_size=100, lr=0.01, max_restarts=1, keep_checkpoints=10,
        parallel={"strategy": "parameter_server", "world_size": 3, "parameter_server": {
            "num_servers": 2, "mode": "sync", "table_lr": 0.1, "table_init_scale": SCALE}},
        candidates=[{"name": "click", "model": {"type": "click", "cardinalities": CARDS,
                                                "dim": 4, "hidden_sizes": [8]}}])
    return write_config(root / "clicks.yaml", raw)


def _candidate(root: Path) -> Path:
    (run,) = (root / "runs" / "tiny").glob("2*")
    return run / "candidates" / "click"


def _train_killing_server_1(cfg: Path, root: Path) -> str:
    marker = f"{os.getpid()}-sparse"
    proc = subprocess.Popen([sys.executable, "-m", "distml", "train", str(cfg)], cwd=root,
                            env={**os.environ, **ENV, "DISTML_TEST_PARENT": marker},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 240, False
    while proc.poll() is None and time.time() < deadline and not killed:
        runs = list((root / "runs" / "tiny").glob("2*/candidates/click/checkpoints"))
        pids = training_ranks(1, marker)
        if runs and complete(runs[0]) and pids:  # mid-epoch 1: its rows saved at the end of epoch 0
            time.sleep(0.2)
            os.kill(next(iter(pids)), signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=240)
    assert killed, out
    assert proc.returncode == 0, out
    return out


def test_click_model_on_row_servers_survives_a_killed_server_and_serves(tmp_path, tiny_raw):
    clean = _config(tmp_path / "clean", json.loads(json.dumps(tiny_raw)))
    distml("train", str(clean), cwd=tmp_path / "clean", env=ENV)
    killed = _config(tmp_path / "killed", tiny_raw)
    out = _train_killing_server_1(killed, tmp_path / "killed")
    assert "resumed from" in out

    # sync with one worker: the restarted server's rows came back, bit for bit
    a = load_file(_candidate(tmp_path / "clean") / "artifact" / "model.safetensors")
    b = load_file(_candidate(tmp_path / "killed") / "artifact" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]

    # the artifact holds each table whole: the servers' rows where touched, elsewhere the
    # initial rows (a pure function of seed, table and row id), never stored on a server
    last, held_rows = complete(_candidate(tmp_path / "clean") / "checkpoints")[-1], []
    for t, card in enumerate(CARDS):
        weight, held = a[f"bags.{t}.weight"], []
        for server in (0, 1):
            rows = load_rows(last, server)
            ids = rows[f"tables/{t}/ids"]
            assert torch.equal(weight[ids], rows[f"tables/{t}/values"])
            assert set((ids % 2).tolist()) <= {server}  # hash partition: row mod servers
            held += ids.tolist()
        assert 0 < len(held) < card
        held_rows += held
        untouched = torch.tensor(sorted(set(range(card)) - set(held)))
        assert torch.equal(weight[untouched], init_rows(untouched, 4, seed=0, table=t,
                                                       scale=SCALE))

    # server 0's evaluations (rows peeked from both servers) are the exported model's
    result = json.loads((_candidate(tmp_path / "clean") / "result.json").read_text())
    assert result["history"]["evals"][-1]["loss"] == result["val"]["loss"]
    tables = result["parameter_server"]["tables"]
    assert tables["table_bytes"] == sum(CARDS) * 4 * 4
    assert sum(tables["rows_held_per_server"]) == len(held_rows)
    assert 0 < max(tables["bytes_held_per_server"]) < tables["table_bytes"]

    # serving hashes as ingestion did: raw text ids or the same ids as numbers
    art = load_artifact(_candidate(tmp_path / "clean") / "artifact")
    assert [p["type"] for p in art.spec["preprocessing"]] == ["standardize", "hash"]
    dense, ids, _ = click_rows(9, 0, 50, cardinalities=CARDS, num_dense=DENSE)
    text = {**{f"d{j}": dense[:, j] for j in range(DENSE)},
            **{f"c{f}": ids[:, f].astype(str) for f in range(len(CARDS))}}
    as_text = art.predict(text)
    assert np.array_equal(as_text, art.predict(np.column_stack([dense, ids]).astype(np.float32)))
    assert as_text.shape == (50, 2)
