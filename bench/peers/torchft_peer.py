"""torchft (0.2.0) beside ``distml train --nnodes 2:3`` in bench/elastic.py: the same job
(an MLP 64-64-10 on digits, AdamW, a global batch of 48 over 3 replica groups of one rank,
a fixed cost per row in the loader) with one replica group SIGKILLed at the same step.

As torchft's README runs it: a lighthouse (``min_replicas 1, quorum_tick_ms 100,
join_timeout_ms 10000``), each replica group a ``Manager`` (``min_replica_size`` 1) with
torchft's ``DistributedDataParallel`` and ``Optimizer`` over ``ProcessGroupGloo``, the data
sharded by replica group as its examples do (each group its third of every global batch).
A step whose all-reduce fails is not committed (its gradients are dropped, the loop goes on
to the next batch, as in torchft's train_ddp.py); the survivors heal without a restart.

    python bench/peers/torchft_peer.py OUT_JSON KILL_AT_STEP EPOCHS SLEEP_PER_ROW_S

Runs in the torchft environment (bench/peers: torch from the main one). Writes each group's
steps (time, committed, participants, the rows it trained) and the kill's time to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

GROUPS, BATCH, LR, SEED = 3, 48, 0.003, 0


def _data() -> tuple:
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(x))
    train = order[: int(0.8 * len(x))]
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    return x.astype("float32"), y, train


def replica(group: int, lighthouse: str, store_port: int, epochs: int, sleep_s: float,
            out: Path) -> None:
    import numpy as np
    import torch
    from torch import nn
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    inner = torch.optim.AdamW(model.parameters(), lr=LR)

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    def save() -> dict:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=10)), min_replica_size=1,
                      load_state_dict=load, state_dict=save, replica_id=f"group{group}",
                      lighthouse_addr=lighthouse, rank=0, world_size=1,
                      store_addr="127.0.0.1", store_port=store_port,
                      timeout=timedelta(seconds=10), quorum_timeout=timedelta(seconds=10))
    optimizer, ddp = Optimizer(manager, inner), DistributedDataParallel(manager, model)
    x, y, train = _data()
    share = BATCH // GROUPS
    with out.open("w") as log:
        for epoch in range(epochs):
            order = np.random.default_rng([SEED, epoch]).permutation(train)
            for b in range(len(order) // BATCH):
                rows = order[b * BATCH + group * share: b * BATCH + (group + 1) * share]
                time.sleep(sleep_s * len(rows))  # the loader's cost per row
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(ddp(torch.from_numpy(x[rows])),
                                                   torch.from_numpy(y[rows]))
                loss.backward()
                before = manager.current_step()
                optimizer.step()
                log.write(json.dumps({
                    "t": time.time(), "epoch": epoch, "committed":
                    manager.current_step() > before, "step": manager.current_step(),
                    "participants": manager.num_participants(),
                    "rows": rows.tolist()}) + "\n")
                log.flush()
    manager.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except (OSError, ValueError):
        return []


def main(out: Path, kill_at: int, epochs: int, sleep_s: float) -> None:
    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, quorum_tick_ms=100,
                                  join_timeout_ms=10000)
    logs = [out.with_suffix(f".group{g}.jsonl") for g in range(GROUPS)]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--replica", str(g),
                               lighthouse.address(), str(_free_port()), str(epochs),
                               str(sleep_s), str(logs[g])]) for g in range(GROUPS)]
    try:
        while not any(s["committed"] and s["step"] >= kill_at for s in _steps(logs[-1])):
            if procs[-1].poll() is not None:
                raise RuntimeError(f"replica group {GROUPS - 1} ended before step {kill_at}")
            time.sleep(0.02)
        os.kill(procs[-1].pid, signal.SIGKILL)  # the machine is gone
        killed = time.time()
        codes = [p.wait(timeout=600) for p in procs[:-1]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lighthouse.shutdown()
    _, _, train = _data()
    out.write_text(json.dumps({"start": start, "end": time.time(), "killed": killed,
                               "exit_codes": codes, "groups": [_steps(p) for p in logs],
                               "rows_per_epoch": len(train) // BATCH * BATCH}))


if __name__ == "__main__":
    if sys.argv[1] == "--replica":
        from torch.distributed import TCPStore

        group, address, port = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
        replica(group, address, port, int(sys.argv[5]), float(sys.argv[6]), Path(sys.argv[7]))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
