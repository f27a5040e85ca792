"""Online serving: ``distml serve`` (dynamic batching on and off) against the Python model
servers people use for the same job, each serving the same digits artifact through its own
documented API, in one run:

- MLServer (Seldon; Open Inference Protocol, adaptive batching on: max_batch_size 64,
  max_batch_time 2 ms), KServe's Python model server (kserve.Model; no batching of its own),
  LitServe (batching on: max_batch_size 64, batch_timeout 2 ms); each in its own virtual
  environment under bench/.venvs/ (bench/peers/);
- plain FastAPI, untuned and tuned (bench/plain_server.py).

The model is the digits main job's mlp-wide candidate (standardize + MLP 64-256-256-10),
trained here for a few epochs. Each server runs alone in its own process on loopback. One
closed-loop load generator (bench/loadgen.py) keeps C requests in flight at C = 1, 8, 32, 64,
for SECONDS per level after a warm-up, REPEATS times (median and min-max reported). All the
servers are started first and stay up; each repeat measures every server's levels in turn,
the servers' order rotating from one repeat to the next, so that a slow minute of the machine
falls on every contender alike rather than on whichever ran then (an idle server costs the
others next to nothing). Payloads:
the protocol's JSON with 1 and 64 rows per request for every server; for distml also the
binary tensor data extension. The load generator shares the machine's cores with the server,
alike for every peer; once, wrk (if installed) measures the same level to cross-check it.
"""

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

from bench.common import save
from bench.loadgen import run_level, summarize
from bench.peers import PEERS, python

LEVELS = (1, 8, 32, 64)
SECONDS, REPEATS = 5.0, 5
ROOT = Path(__file__).parents[1]
PATH = "/v2/models/digits/infer"
JSON_HEADERS = "Content-Type: application/json\r\n"
PEER_NAMES = ("mlserver", "kserve", "litserve")


def _train(root: Path) -> tuple[Path, np.ndarray]:
    raw = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    raw["train"]["candidates"] = [c for c in raw["train"]["candidates"] if c["name"] == "mlp-wide"]
    raw["train"]["epochs"] = 5
    raw.update(output_dir=str(root / "runs"), registry=str(root / "registry"))
    (root / "digits.yaml").write_text(yaml.safe_dump(raw))
    subprocess.run([sys.executable, "-m", "distml", "run", str(root / "digits.yaml"), "-q"],
                   check=True, cwd=root)
    from sklearn.datasets import load_digits

    return root / "registry" / "digits" / "v1", load_digits().data.astype(np.float32)


def _payloads(rows: np.ndarray) -> dict[str, list[tuple[bytes, str]]]:
    """Request bodies by payload kind, cycling over the digits rows."""
    out: dict[str, list[tuple[bytes, str]]] = {}
    for n in (1, 64):
        chunks = [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)][:200]
        out[f"json{n}"] = [(json.dumps({"inputs": [{
            "name": "input", "datatype": "FP32", "shape": list(c.shape),
            "data": c.tolist()}]}).encode(), JSON_HEADERS) for c in chunks]
        binary = []
        for c in chunks:
            head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                           "shape": list(c.shape),
                                           "parameters": {"binary_data_size": c.nbytes}}],
                               "parameters": {"binary_data_output": True}}).encode()
            binary.append((head + c.tobytes(), "Content-Type: application/octet-stream\r\n"
                           f"Inference-Header-Content-Length: {len(head)}\r\n"))
        out[f"bin{n}"] = binary
    return out


def _commands(artifact: Path, folder: Path) -> dict[str, tuple[list[str], int]]:
    """Each server's command line and HTTP port."""
    cmds: dict[str, tuple[list[str], int]] = {}
    for name, flags in {"distml_batched": ["--max-batch-size", "64", "--max-delay-ms", "2"],
                        "distml_unbatched": ["--no-batching"]}.items():
        port = free_port()
        cmds[name] = ([sys.executable, "-m", "distml", "serve", str(artifact), "--port",
                       str(port), "--max-queue-rows", "100000", *flags], port)
    for name, extra in {"plain_fastapi": [], "plain_fastapi_tuned": ["--tuned"]}.items():
        port = free_port()
        cmds[name] = ([sys.executable, "-m", "bench.plain_server", str(artifact), str(port),
                       *extra], port)
    port = free_port()
    cmds["litserve"] = ([str(python("litserve")), str(PEERS / "litserve_peer.py"),
                         str(artifact), str(port)], port)
    port = free_port()
    cmds["kserve"] = ([str(python("kserve")), str(PEERS / "kserve_peer.py"), str(artifact),
                       str(port), str(free_port())], port)
    port = free_port()
    cmds["mlserver"] = ([str(python("mlserver").parent / "mlserver"), "start",
                         str(_mlserver_folder(artifact, folder / "mlserver", port))], port)
    return cmds


def _mlserver_folder(artifact: Path, folder: Path, port: int) -> Path:
    """MLServer's documented layout: settings.json and a model folder with
    model-settings.json naming the runtime class (bench/peers/mlserver_peer.py)."""
    model = folder / "digits"
    model.mkdir(parents=True, exist_ok=True)
    shutil.copy(PEERS / "mlserver_peer.py", model / "mlserver_peer.py")
    (folder / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
        "debug": False, "parallel_workers": 0}))  # see module docstring
    (model / "model-settings.json").write_text(json.dumps({
        "name": "digits", "implementation": "mlserver_peer.DigitsRuntime",
        "parameters": {"uri": str(artifact)}, "max_batch_size": 64, "max_batch_time": 0.002}))
    return folder


def _start(cmd: list[str], port: int, body: bytes, folder: Path) -> subprocess.Popen:
    import httpx

    # This checkout's sources first, so that distml serve is the code under test.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    # A session of its own: stopping it stops the worker processes some servers start.
    # Its log goes to a file: a pipe that nobody reads while the others are measured
    # would block a server that logs each request.
    log = folder / f"server-{port}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": path},
                                start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            r = httpx.post(f"http://127.0.0.1:{port}{PATH}", content=body,
                           headers={"content-type": "application/json"})
            if r.status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{cmd} did not answer within 180 s")


def _plan(name: str) -> list[tuple[str, int]]:
    """(payload, concurrency) to measure for a server."""
    plan = [("json1", c) for c in LEVELS] + [("json64", 32)]
    if name.startswith("distml"):
        plan += [("json64", 1), ("bin64", 1), ("bin64", 32)]
    if name == "distml_batched":
        plan += [("bin1", c) for c in LEVELS]
    return plan


def _measure_all(servers: dict[str, int], payloads: dict) -> dict[str, dict]:
    """Every server's plan, REPEATS times, interleaved (see the module's docstring)."""
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in servers}
    names = list(servers)
    for repeat in range(REPEATS):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            for payload, c in _plan(name):
                run = run_level(servers[name], PATH, payloads[payload], c, seconds=SECONDS)
                runs[name].setdefault(f"{payload}_c{c}", []).append(run)
                print(f"[{repeat + 1}/{REPEATS}]", name, payload, c,
                      round(run["throughput_rps"], 1), flush=True)
    return {name: {key: summarize(r) for key, r in levels.items()}
            for name, levels in runs.items()}


def _stop(proc: subprocess.Popen) -> None:
    """The server and every process of its session."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
            break
        except subprocess.TimeoutExpired:
            continue


def _wrk_check(port: int, body: bytes) -> dict | None:
    """The same level (one JSON row, c=32) measured by wrk and by ours, back to back."""
    if shutil.which("wrk") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = {json.dumps(body.decode())}\n")
    try:
        out = subprocess.run(["wrk", "-t1", "-c32", f"-d{int(SECONDS)}s", "--latency", "-s",
                              f.name, f"http://127.0.0.1:{port}{PATH}"], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rps = float(out.split("Requests/sec:")[1].split()[0])
    ours = run_level(port, PATH, [(body, JSON_HEADERS)], 32, seconds=SECONDS)
    non_2xx = out.split("Non-2xx or 3xx responses:")[1].split()[0] if "Non-2xx" in out else "0"
    return {"wrk_rps": rps, "ours_rps": ours["throughput_rps"], "wrk_non_2xx": int(non_2xx),
            "ours_over_wrk": round(ours["throughput_rps"] / rps, 3)}


def _raw_forward_ms(artifact: Path, rows: np.ndarray) -> float:
    """Median time of the served model's own work for one row, in this process: what a
    request would cost with no server at all."""
    from distml.serving.model import load_served_model

    model = load_served_model(str(artifact), registry=artifact.parent)
    times = []
    for i in range(2000):
        start = time.perf_counter()
        model.infer(rows[i % len(rows)][None])
        times.append(time.perf_counter() - start)
    return float(np.median(times[200:]) * 1000)


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        artifact, rows = _train(Path(tmp))
        payloads = _payloads(rows)
        raw_ms = _raw_forward_ms(artifact, rows)
        results: dict[str, dict] = {}
        servers: dict[str, int] = {}
        with contextlib.ExitStack() as stack:
            for name, (cmd, port) in _commands(artifact, Path(tmp)).items():
                try:
                    stack.callback(_stop, _start(cmd, port, payloads["json1"][0][0], Path(tmp)))
                    servers[name] = port
                except Exception as e:  # noqa: BLE001 - reported; the other servers still run
                    results[name] = {"failed": f"{type(e).__name__}: {str(e)[-500:]}"}
                    print(name, "failed:", e, flush=True)
            results.update(_measure_all(servers, payloads))
            if "distml_batched" in servers:
                results["distml_batched"]["wrk_check"] = _wrk_check(
                    servers["distml_batched"], payloads["json1"][0][0])
    return _summarize(results, raw_ms)


def _summarize(results: dict[str, dict], raw_ms: float) -> dict:
    d, u = results["distml_batched"], results["distml_unbatched"]
    peers = {p: results[p]["json1_c32"] for p in PEER_NAMES if "json1_c32" in results[p]}
    best = max(peers, key=lambda p: peers[p]["throughput_rps"]) if peers else None
    ours = d["json1_c32"]
    result = {
        "model": "digits mlp-wide (64-256-256-10, standardize)",
        "levels": list(LEVELS), "seconds_per_level": SECONDS, "repeats": REPEATS,
        "cpu_count": os.cpu_count(),
        "ratio_vs_best_peer_c32": (round(ours["throughput_rps"] / peers[best]["throughput_rps"],
                                         2) if best else None),
        "best_peer_c32": best,
        "p99_vs_best_peer_c32_ms": [ours["p99_ms"], peers[best]["p99_ms"]] if best else None,
        "batching_speedup_c32": round(ours["throughput_rps"] / u["json1_c32"]["throughput_rps"],
                                      2),
        "binary_vs_json_64rows": round(d["bin64_c32"]["throughput_rps"]
                                       / d["json64_c32"]["throughput_rps"], 2),
        "raw_forward_ms": round(raw_ms, 3),
        "overhead_vs_raw_forward_c1_ms": round(d["json1_c1"]["p50_ms"] - raw_ms, 3),
        "overhead_vs_raw_forward_c1_binary_ms": round(d["bin1_c1"]["p50_ms"] - raw_ms, 3),
        "wrk_check": d.get("wrk_check"),
        "results": results,
    }
    save("serve", result)
    return result


def _cell(r: dict) -> str:
    if "throughput_rps" not in r:
        return "failed"
    lo, hi = r["throughput_min_max"]
    return f"{r['throughput_rps']:,.0f} req/s ({lo:,.0f}-{hi:,.0f}), p99 {r['p99_ms']:.1f} ms"


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    res = r["results"]
    d = res["distml_batched"]
    best = r["best_peer_c32"]
    rows = [
        ("serve, c=32", "ratio_vs_best_peer_c32",
         f"{r['ratio_vs_best_peer_c32']} (distml {_cell(d['json1_c32'])}; best peer {best} "
         f"{_cell(res[best]['json1_c32']) if best else '-'})", ">= 1.2, p99 no worse"),
        ("serve, c=32", "batching_speedup_c32",
         f"{r['batching_speedup_c32']:.2f} (unbatched "
         f"{_cell(res['distml_unbatched']['json1_c32'])})",
         ">= 4"),
        ("serve, 64 rows, c=32", "binary_vs_json_64rows",
         f"{r['binary_vs_json_64rows']:.2f} (binary {_cell(d['bin64_c32'])}; JSON "
         f"{_cell(d['json64_c32'])})", ">= 2"),
        ("serve, c=1", "overhead_vs_raw_forward_c1_ms",
         f"{r['overhead_vs_raw_forward_c1_ms']:.2f} ms JSON, "
         f"{r['overhead_vs_raw_forward_c1_binary_ms']:.2f} ms binary (p50 "
         f"{d['json1_c1']['p50_ms']:.2f} ms; forward alone {r['raw_forward_ms']:.2f} ms)",
         "<= 1 ms"),
    ]
    for c in r["levels"]:
        cells = "; ".join(f"{k} {_cell(v[f'json1_c{c}']) if f'json1_c{c}' in v else 'failed'}"
                          for k, v in res.items())
        rows.append((f"serve, 1 row, c={c}", "throughput (min-max), p99", cells, "reported"))
    cells = "; ".join(f"{k} {_cell(v['json64_c32']) if 'json64_c32' in v else 'failed'}"
                      for k, v in res.items())
    rows.append(("serve, 64 rows JSON, c=32", "throughput (min-max), p99", cells, "reported"))
    if r.get("wrk_check"):
        w = r["wrk_check"]
        rows.append(("serve, load generator", "ours vs wrk, c=32",
                     f"{w['ours_over_wrk']:.2f} (ours {w['ours_rps']:,.0f}, wrk "
                     f"{w['wrk_rps']:,.0f} req/s)", "~1"))
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
