"""What drift monitoring costs a served request: ``distml serve`` on the digits artifact with
monitoring on (the default: each answered request's rows go on a queue that a thread of the
same process feeds to the detectors) and off (``--no-monitor``), both servers up at once and
measured in turns (bench/serve.py's load generator, placement, seconds and rounds), one JSON
row per request at c = 1 and c = 32. The drift thread shares the process, and so the interpreter's
lock, with the request path: this is where its cost would show.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from tests.helpers.net import free_port

from bench.common import save
from bench.loadgen import run_level, summarize
from bench.serve import LOADGEN_CPUS, ROUNDS, SECONDS, SERVER_CPUS, _payloads
from bench.serve_servers import PATH, start, stop, train

REPEATS = ROUNDS

LEVELS = (1, 32)
SERVERS = {"monitored": [], "unmonitored": ["--no-monitor"]}


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        from sklearn.datasets import load_digits

        artifact = train(Path(tmp) / "digits", "digits")
        payload = _payloads(load_digits().data.astype(np.float32))["json1"]
        runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in LEVELS}
                                                  for name in SERVERS}
        with contextlib.ExitStack() as stack:
            ports = {}
            for name, flags in SERVERS.items():
                port = ports[name] = free_port()
                cmd = [sys.executable, "-m", "distml", "serve", str(artifact), "--port",
                       str(port), *flags]
                stack.callback(stop, start(cmd, SERVER_CPUS, port, payload[0][0], Path(tmp)))
            os.sched_setaffinity(0, {int(LOADGEN_CPUS)})
            for repeat in range(REPEATS):
                order = list(SERVERS) if repeat % 2 == 0 else list(SERVERS)[::-1]
                for name in order:
                    for c in LEVELS:
                        run = run_level(ports[name], PATH, payload, c, seconds=SECONDS)
                        runs[name][c].append(run)
                        print(f"[{repeat + 1}/{REPEATS}]", name, c,
                              round(run["throughput_rps"], 1), flush=True)
    results = {name: {f"json1_c{c}": summarize(r) for c, r in levels.items()}
               for name, levels in runs.items()}
    on, off = results["monitored"], results["unmonitored"]
    result = {
        "levels": list(LEVELS), "seconds_per_level": SECONDS, "repeats": REPEATS,
        "throughput_ratio_c32": round(on["json1_c32"]["throughput_rps"]
                                      / off["json1_c32"]["throughput_rps"], 3),
        "p50_added_c1_ms": round(on["json1_c1"]["p50_ms"] - off["json1_c1"]["p50_ms"], 3),
        "results": results,
    }
    save("serve_monitor", result)
    return result


def _cell(r: dict) -> str:
    lo, hi = r["throughput_min_max"]
    return (f"{r['throughput_rps']:,.0f} req/s ({lo:,.0f}-{hi:,.0f}), p50 {r['p50_ms']:.2f} "
            f"ms, p99 {r['p99_ms']:.1f} ms")


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    on, off = r["results"]["monitored"], r["results"]["unmonitored"]
    return [
        ("serve, drift monitoring, c=32", "throughput monitored / unmonitored",
         f"{r['throughput_ratio_c32']:.3f} (on {_cell(on['json1_c32'])}; off "
         f"{_cell(off['json1_c32'])})", "~1 (within the spread)"),
        ("serve, drift monitoring, c=1", "p50 added by monitoring",
         f"{r['p50_added_c1_ms']:+.3f} ms (on {_cell(on['json1_c1'])}; off "
         f"{_cell(off['json1_c1'])})", "~0"),
    ]


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
