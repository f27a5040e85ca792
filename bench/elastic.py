"""Elastic training: a node lost mid-run, on loopback "nodes" (one torch agent each).

Two jobs of the same training (ddp, an MLP on digits, a fixed global batch, a checkpoint
every few steps), each on 3 agents on this machine; at the same step one agent and its ranks
are killed (SIGKILL, as a preempted machine):

- elastic (``distml train --nnodes 2:3``): the two others re-form at the next rendezvous
  and go on from the newest checkpoint at world size 2;
- fixed restart (``--nnodes 3:3``, torchrun's restart-everything behaviour): the job waits for
  3 nodes again; the lost one is replaced after ``REPLACE_AFTER_S`` (a machine rescheduled),
  then all ranks restart from the checkpoint.

Measured: ``recovery_seconds`` (the kill to the first step after it, from the elastic job's
record), ``samples_lost`` (rows of an epoch not used, from the ranks' per-row counts),
``steps_lost`` (steps after the checkpoint, redone), and ``time_to_finish_vs_fixed_restart``
(wall time of the elastic job over the fixed one's). Each row costs ``SLEEP_PER_ROW_S`` in
the loader (a stand-in for decoding), so a step's time follows the rows per rank.
Then the same job and loss under torchft (``bench/peers/torchft_peer.py``, in an
environment of its own: per-step fault tolerance, the survivors go on without a restart and
without re-dealing the lost group's rows), and a parameter-server worker joins a running job
(``bench/ps_join.py``: row ``ps_worker_join``, the time from its admission to its first
gradient applied).
``DISTML_BENCH_QUICK=1``: fewer steps and a shorter replacement delay; saves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import ps_join
from bench.common import QUICK, processes, save

ROOT = Path(__file__).parents[1]
EPOCHS = 2 if QUICK else 3
BATCH = 48  # the global batch: 16 rows per rank on 3 nodes, 24 on 2
KILL_AT_STEP = 12 if QUICK else 32  # between checkpoints
CHECKPOINT_EVERY = 5
REPLACE_AFTER_S = 5.0 if QUICK else 20.0
ROUNDS = 1 if QUICK else 3
SLEEP_PER_ROW_S = 0.01
RDZV_CONF = "keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=1"


def sleepy_rows(x, y):
    """The loader's map function: a fixed cost per row."""
    time.sleep(SLEEP_PER_ROW_S * len(x))
    return x, y


def config(out: Path) -> dict[str, Any]:
    return {
        "name": "el", "seed": 0, "output_dir": str(out),
        "data": {"source": "sklearn:digits", "loader": {"map_fn": "bench.elastic:sleepy_rows"}},
        "monitor": {"tensorboard": False},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.003,
                  "checkpoint_every_steps": CHECKPOINT_EVERY, "restore_best": False,
                  "max_restarts": 3,
                  "parallel": {"strategy": "ddp", "world_size": 3, "num_nodes": 3},
                  "candidates": [{"name": "small", "model": {"type": "mlp",
                                                             "hidden_sizes": [64]}}]},
    }


class Job:
    """Agents of one job on this machine; agent 0 serves the rendezvous."""

    def __init__(self, root: Path, name: str, port: int, nnodes: str) -> None:
        self.root, self.name, self.port, self.nnodes = root, name, port, nnodes
        self.out = root / name
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config(self.out)))
        self.agents: list[subprocess.Popen] = []

    def start_agent(self) -> subprocess.Popen:
        host = "" if not self.agents else ",is_host=0"
        argv = [sys.executable, "-m", "distml", "train", f"{self.name}.yaml", "--quiet",
                "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--nnodes", self.nnodes,
                "--rdzv-id", self.name, "--rdzv-conf", RDZV_CONF + host]
        env = {**os.environ, "DISTML_PREFLIGHT": "0", "OMP_NUM_THREADS": "1",
               "LOGLEVEL": "INFO",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"),
                                              os.environ.get("PYTHONPATH", "")])}
        log = (self.root / f"{self.name}-{len(self.agents)}.log").open("a")
        proc = subprocess.Popen(argv, cwd=self.root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.agents.append(proc)
        return proc

    def candidate(self) -> Path | None:
        runs = sorted(self.out.glob("el/2*/candidates/small"))
        return runs[-1] if runs else None

    def step(self) -> int:
        folder = self.candidate()
        try:
            return json.loads((folder / "checkpoints" / "last-step.json").read_text())["step"]
        except (OSError, ValueError, TypeError):
            return 0

    def wait_step(self, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.step() < step:
            if time.monotonic() > deadline or all(a.poll() is not None for a in self.agents):
                raise RuntimeError(f"{self.name}: step {step} not reached; see {self.root}")
            time.sleep(0.05)

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        for a in self.agents:
            if a.poll() is None and a.returncode is None:
                a.wait(max(1.0, deadline - time.monotonic()))

    def kill(self, i: int) -> float:
        """Kill agent ``i`` and its ranks (the machine is gone); returns the time."""
        kill_tree(self.agents[i].pid)
        t = time.time()
        self.agents[i].wait()
        return t

    def stop(self) -> None:
        for a in self.agents:
            if a.poll() is None:
                kill_tree(a.pid)
                a.wait()

    def result(self) -> dict[str, Any]:
        return json.loads((self.candidate() / "result.json").read_text())


def _wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torch's agent starts each rank in a session of
    its own, so the agent's process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for child, fields in processes().items():
        children.setdefault(int(fields[1]), []).append(child)
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    for p in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def run(root: Path, name: str, port: int, *, elastic: bool) -> dict[str, Any]:
    # (the fixed job is 3:3: torchrun's fixed size, with the same deal and records)
    job = Job(root, name, port, "2:3" if elastic else "3:3")
    start = time.time()
    try:
        job.start_agent()
        _wait_listening(port)  # agent 0 serves the rendezvous; then the others at once, so
        job.start_agent()  # that the first round has all 3 (not 2, then a join)
        job.start_agent()
        job.wait_step(KILL_AT_STEP)
        killed = job.kill(2)
        if not elastic:
            time.sleep(REPLACE_AFTER_S)  # the lost machine comes back (rescheduled)
            job.start_agent()
        job.wait()
        end = time.time()
        seconds = end - start
        result = job.result()
    finally:
        job.stop()
    codes = [a.returncode for a in job.agents]
    changes = result.get("elastic", {}).get("membership_changes", [])
    after = [c for c in changes if c.get("first_step_time", 0) > killed]
    samples = result.get("elastic", {}).get("epoch_samples", [])
    return {
        "seconds": seconds, "seconds_after_loss": end - killed,
        "agent_exit_codes": codes, "steps": result["steps"],
        "world_size_at_end": result["world_size"], "membership_changes": changes,
        "epoch_samples": samples,
        "recovery_seconds": after[0]["first_step_time"] - killed if after else None,
        "steps_lost": after[0]["steps_lost"] if after else None,
        "samples_lost": sum(e["unused"] for e in samples),
        "samples_repeated": sum(e["repeated"] for e in samples),
        "val_accuracy": result["val"].get("accuracy"),
    }


def torchft(root: Path) -> dict[str, Any] | str:
    """The same job and loss under torchft (bench/peers/torchft_peer.py), or why not."""
    from bench.peers import PEERS, python

    out = root / "torchft.json"
    try:
        subprocess.run([str(python("torchft")), str(PEERS / "torchft_peer.py"), str(out),
                        str(KILL_AT_STEP), str(EPOCHS), str(SLEEP_PER_ROW_S)], check=True,
                       cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        return f"torchft did not run: {type(e).__name__}: {e}"
    run = json.loads(out.read_text())
    killed, survivors = run["killed"], run["groups"][:-1]
    after = [s for g in survivors for s in g if s["t"] > killed]
    committed = [s for g in run["groups"] for s in g if s["committed"]]
    used: dict[int, set[int]] = {}
    for s in committed:
        used.setdefault(s["epoch"], set()).update(s["rows"])
    return {
        "seconds": run["end"] - run["start"], "seconds_after_loss": run["end"] - killed,
        "recovery_seconds": min(s["t"] for s in after if s["committed"]) - killed,
        "steps_lost": sum(not s["committed"] for s in after),
        "samples_lost": sum(run["rows_per_epoch"] - len(used.get(e, ()))
                            for e in range(EPOCHS)),
        "participants_at_end": survivors[0][-1]["participants"],
        "exit_codes": run["exit_codes"],
    }


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="distml-bench-elastic-") as tmp:
        start = time.perf_counter()
        rounds = []
        for r in range(ROUNDS):  # the three jobs of a round one after another
            root = Path(tmp) / f"round{r}"
            root.mkdir()
            rounds.append({"elastic": run(root, "elastic", 29731 + 2 * r, elastic=True),
                           "fixed_restart": run(root, "fixed", 29732 + 2 * r, elastic=False),
                           "torchft": torchft(root)})
        joined = ps_join.run(Path(tmp))
        total = time.perf_counter() - start
    elastic = [x["elastic"] for x in rounds]
    result = {
        "recovery_seconds": _spread([e["recovery_seconds"] for e in elastic]),
        "samples_lost": max(e["samples_lost"] for e in elastic),  # the worst round
        "time_to_finish_vs_fixed_restart": _spread(
            [x["elastic"]["seconds"] / x["fixed_restart"]["seconds"] for x in rounds]),
        # the same from the node's loss on (the jobs are alike before it)
        "after_loss_vs_fixed_restart": _spread(
            [x["elastic"]["seconds_after_loss"] / x["fixed_restart"]["seconds_after_loss"]
             for x in rounds]),
        "steps_lost": _spread([e["steps_lost"] for e in elastic]),
        "samples_repeated": max(e["samples_repeated"] for e in elastic),
        "torchft": _torchft_summary([x["torchft"] for x in rounds]),
        "rounds": rounds, "ps_worker_join": joined,
        "setup": {"nodes": "3 torch agents on loopback, 1 rank each", "strategy": "ddp",
                  "global_batch": BATCH, "epochs": EPOCHS, "kill_at_step": KILL_AT_STEP,
                  "checkpoint_every_steps": CHECKPOINT_EVERY,
                  "replace_after_s": REPLACE_AFTER_S, "sleep_per_row_s": SLEEP_PER_ROW_S,
                  "rdzv_conf": RDZV_CONF, "rounds": ROUNDS},
        "quick": QUICK, "bench_seconds": total,
    }
    if not QUICK:
        save("elastic", result)
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    """The median and min-max of the rounds' values."""
    return {"median": round(statistics.median(values), 3),
            "min_max": [round(min(values), 3), round(max(values), 3)]}


def _torchft_summary(runs: list[dict[str, Any] | str]) -> dict[str, Any] | str:
    done = [r for r in runs if isinstance(r, dict)]
    if not done:
        return runs[0]
    return {"recovery_seconds": _spread([r["recovery_seconds"] for r in done]),
            "steps_lost": max(r["steps_lost"] for r in done),
            "samples_lost": _spread([r["samples_lost"] for r in done]),
            "rounds": len(done)}


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    what = f"elastic ddp, 3 -> 2 loopback nodes ({r['setup']['rounds']} rounds)"
    ratio = r["time_to_finish_vs_fixed_restart"]
    return [
        (what, "recovery_seconds", f"{_fmt(r['recovery_seconds'], '.1f')} s (kill to next "
         f"step; steps since the checkpoint redone: {_fmt(r['steps_lost'], '.0f')})",
         "<= 10 s"),
        (what, "samples_lost", f"{r['samples_lost']} in the worst round (rows used twice: "
         f"{r['samples_repeated']})", "0"),
        (what, "time_to_finish_vs_fixed_restart",
         f"{_fmt(ratio, '.2f')} (replacement node after "
         f"{r['setup']['replace_after_s']:.0f} s; from the loss on: "
         f"{_fmt(r['after_loss_vs_fixed_restart'], '.2f')})", "<= 0.8"),
        *_torchft_rows(r.get("torchft")),
        *_ps_join_rows(r.get("ps_worker_join")),
    ]


def _fmt(spread: dict[str, Any], spec: str) -> str:
    low, high = spread["min_max"]
    return f"{spread['median']:{spec}} ({low:{spec}}-{high:{spec}})"


def _torchft_rows(t: dict[str, Any] | str | None) -> list[tuple[str, str, str, str]]:
    if not isinstance(t, dict):
        return []
    what = "torchft 0.2.0 (peer), 3 -> 2 replica groups"
    return [(what, "recovery_seconds", f"{_fmt(t['recovery_seconds'], '.1f')} s (kill to next "
             f"committed step; steps not committed: {t['steps_lost']})", "-"),
            (what, "samples_lost", f"{_fmt(t['samples_lost'], '.0f')} (the lost group's "
             "share of each later batch: no re-deal)", "-")]


def _ps_join_rows(j: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    if not j or j["join_to_first_gradient_s"] is None:
        return []
    return [("parameter server, a worker joins (1 + 1 loopback)", "ps_worker_join",
             f"{j['join_to_first_gradient_s']:.2f} s admitted to first gradient applied "
             f"({j['command_to_first_gradient_s']:.1f} s from the command; "
             f"{j['joiner_items']} items; every item once: {j['every_item_once']})", "-")]


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
