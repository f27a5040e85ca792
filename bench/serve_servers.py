"""The contenders of bench/serve.py: the two models' artifacts, each server's command line
(pinned with taskset to the server's cores, the same for every server), starting and
stopping them, the model's own forward time, and the wrk cross-check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from tests.helpers.net import free_port

from bench.common import processes
from bench.loadgen import run_level
from bench.peers import PEERS, python

ROOT = Path(__file__).parents[1]
PATH = "/v2/models/digits/infer"
JSON_HEADERS = "Content-Type: application/json\r\n"
# The two models: the digits main job's mlp-wide candidate (a forward of ~0.2 ms: the server's
# own cost dominates) and a wide MLP (64-3072-3072-3072-10, ~28 M parameters: ~3 ms for one
# row, ~25 ms for 64, so batching is what decides its throughput). Both registered as
# "digits", so every server answers at one path.
MODELS = {"digits": {"name": "mlp-wide", "model": {"type": "mlp", "hidden_sizes": [256, 256],
                                                   "dropout": 0.1}, "epochs": 5},
          "wide": {"name": "wide", "model": {"type": "mlp", "hidden_sizes": [3072] * 3},
                   "epochs": 1}}
PEER_NAMES = ("plain_fastapi_tuned", "mlserver", "kserve", "litserve", "rayserve")


def train(root: Path, model: str) -> Path:
    """The model's artifact, trained on digits here (a few epochs: its accuracy is not what is
    measured)."""
    spec = MODELS[model]
    raw = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    raw["train"]["candidates"] = [{"name": spec["name"], "model": spec["model"]}]
    raw["train"]["epochs"] = spec["epochs"]
    raw.update(output_dir=str(root / "runs"), registry=str(root / "registry"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "digits.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "distml", "run", str(root / "digits.yaml"), "-q"],
                   check=True, cwd=root)
    return root / "registry" / "digits" / "v1"


def commands(artifact: Path, folder: Path, wanted: list[str]) -> dict[str, tuple[list, int]]:
    """Each wanted server's command line (unpinned) and HTTP port."""
    cmds: dict[str, tuple[list[str], int]] = {}
    serve = [sys.executable, "-m", "distml", "serve", str(artifact), "--max-queue-rows",
             "100000", "--port"]
    plain = [sys.executable, "-m", "bench.plain_server", str(artifact)]
    every = {
        "distml_batched": lambda p: [*serve, str(p)],  # the defaults: continuous batching
        "distml_unbatched": lambda p: [*serve, str(p), "--no-batching"],
        "distml_replicas2": lambda p: [*serve, str(p), "--replicas", "2"],
        "plain_fastapi_tuned": lambda p: [*plain, str(p), "--tuned"],
        "plain_fastapi_tuned_workers2": lambda p: [*plain, str(p), "--workers", "2"],
        "litserve": lambda p: [str(python("litserve")), str(PEERS / "litserve_peer.py"),
                               str(artifact), str(p)],
        "rayserve": lambda p: [str(python("rayserve")), str(PEERS / "rayserve_peer.py"),
                               str(artifact), str(p)],
        "kserve": lambda p: [str(python("kserve")), str(PEERS / "kserve_peer.py"),
                             str(artifact), str(p), str(free_port())],
        "mlserver": lambda p: [str(python("mlserver").parent / "mlserver"), "start",
                               str(_mlserver_folder(artifact, folder / "mlserver", p))],
    }
    for name in wanted:
        port = free_port()
        cmds[name] = (every[name](port), port)
    return cmds


def _mlserver_folder(artifact: Path, folder: Path, port: int) -> Path:
    """MLServer's documented layout: settings.json and a model folder with
    model-settings.json naming the runtime class (bench/peers/mlserver_peer.py)."""
    model = folder / "digits"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS / "mlserver_peer.py", model / "mlserver_peer.py")
    (folder / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "debug": False, "parallel_workers": 0}))  # its workers fail with uvloop 0.23
    (model / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_peer.DigitsRuntime",
        "parameters": {"uri": str(artifact)}, "max_batch_size": 64, "max_batch_time": 0.002}))
    return folder


def start(cmd: list[str], cpus: str, port: int, body: bytes, folder: Path) -> subprocess.Popen:
    """The server, pinned to ``cpus`` (taskset: every process it starts inherits them), once
    it answers an infer request."""
    import httpx

    # This checkout's sources first, so that distml serve is the code under test.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    # A session of its own: stopping it stops the worker processes some servers start. Its
    # log goes to a file: a pipe nobody reads would block a server that logs each request.
    log = folder / f"server-{port}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], stdout=subprocess.DEVNULL,
                                stderr=err, cwd=ROOT, env={**os.environ, "PYTHONPATH": path},
                                start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            r = httpx.post(f"http://127.0.0.1:{port}{PATH}", content=body,
                           headers={"content-type": "application/json"})
            if r.status_code == 200:
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd} did not answer within 240 s")


def cpu_seconds(proc: subprocess.Popen) -> float:
    """CPU time (user + system) used so far by the live processes of the server's session."""
    ticks = sum(int(f[11]) + int(f[12]) for f in processes().values()
                if int(f[3]) == proc.pid)  # the process group: start()'s session
    return ticks / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen) -> None:
    """The server and every process of its session."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
            break
        except subprocess.TimeoutExpired:
            continue


def raw_forward_ms(artifact: Path, rows: np.ndarray, cpus: set[int]) -> float:
    """Median time of the served model's own work for one row, in this process pinned to the
    server's cores with one torch thread: what a request would cost with no server at all."""
    import torch

    from distml.serving.model import load_served_model

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    threads = torch.get_num_threads()
    torch.set_num_threads(len(cpus))
    try:
        model = load_served_model(str(artifact), registry=artifact.parent)
        times = []
        for i in range(600):
            start = time.perf_counter()
            model.infer(rows[i % len(rows)][None])
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, before)
    return float(np.median(times[100:]) * 1000)


def wrk_check(port: int, body: bytes, seconds: float, loadgen_cpus: str) -> dict | str:
    """The same level (one JSON row, c=32) measured by wrk and by ours, back to back, both
    on the load generator's cores; a sentence when wrk is not installed."""
    if shutil.which("wrk") is None:
        return "wrk is not installed on this machine: no cross-check"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body.decode())}\n")
    try:
        out = subprocess.run(["taskset", "-c", loadgen_cpus, "wrk", "-t1", "-c32",
                              f"-d{max(1, round(seconds))}s", "--latency", "-s", f.name,
                              f"http://127.0.0.1:{port}{PATH}"], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rps = float(out.split("Requests/sec:")[1].split()[0])
    ours = run_level(port, PATH, [(body, JSON_HEADERS)], 32, seconds=seconds)
    non_2xx = out.split("Non-2xx or 3xx responses:")[1].split()[0] if "Non-2xx" in out else "0"
    return {"wrk_rps": rps, "ours_rps": ours["throughput_rps"], "wrk_non_2xx": int(non_2xx),
            "ours_over_wrk": round(ours["throughput_rps"] / rps, 3)}
