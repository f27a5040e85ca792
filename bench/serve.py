"""Online serving: ``distml serve`` against the servers a user would pick for the same job,
each serving the same artifact through its own documented API, on pinned cores, in one run.

Contenders: distml (defaults: continuous batching; and ``--no-batching``), plain FastAPI tuned
by hand (bench/plain_server.py: ``async def``, one torch thread, bytes out), MLServer 1.7.1
(adaptive batching: 64 rows, 2 ms), KServe 0.21's Python model server (no batching of its
own), LitServe 0.2.19 (batching: 64, 2 ms) and Ray Serve 2.60 (``@serve.batch``: 64, 2 ms);
the peers each in a virtual environment of their own (bench/peers/).

Models (bench/serve_servers.py): the digits MLP (a forward of ~0.2 ms: overhead-bound) and a
wide MLP (~3 ms for one row: compute-bound, where batching decides).

Placement: every server is pinned with taskset to core 0 (it and every process it starts),
the load generator (this process) to core 1; the same for every server. The two-process run
(``distml serve --replicas 2`` against tuned FastAPI under uvicorn's ``--workers 2``) pins the
server to cores 0-1 and the load generator to core 2 when there is one; with 2 cores it
shares cores 0-1 with the server (said in the result). One distml replica is measured there
too (``replicas_2_vs_1_same_cores``: what the second replica adds on the same cores).

Load (bench/loadgen.py): closed loop, C connections with one request each in flight (C = 1,
8, 32; one JSON row per request, and 64 rows at C = 32), and open loop: Poisson arrivals at
50% and 80% of the server's capacity as measured at C = 32 in the same round (p50, p99 from
each request's scheduled arrival); and once per round distml and the round's best peer at
C = 32, each started afresh, open loop at one rate, 80% of that peer's capacity
(``p99_at_same_rate_vs_best_peer``: at 80% of its own capacity a server five times faster is
offered five times the rate). Every level: a warm-up, then SECONDS of measurement. ROUNDS
rounds each measure every server's levels, the servers' order rotating between rounds; a
server is started for its turn and stopped after it, so that no idle server takes CPU from
the one measured (an idle Ray cluster keeps several processes busy). Ratios are taken within
each round (ours / the peer's, measured minutes apart at most) and reported as the median and
min-max of the rounds' ratios; the best peer of a level is the peer with the highest median there.

    python -m bench serve                      # the full run: ~14 min on 2 cores
    DISTML_BENCH_QUICK=1 python -m bench serve # 1 round of 1 s levels, to check it runs
    DISTML_BENCH_SERVE_PEERS=plain_fastapi_tuned,rayserve ...  # a subset of the peers
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.common import QUICK, save
from bench.loadgen import run_level, run_open, summarize
from bench.serve_servers import (
    JSON_HEADERS,
    PATH,
    PEER_NAMES,
    commands,
    cpu_seconds,
    raw_forward_ms,
    start,
    stop,
    train,
    wrk_check,
)

SECONDS, WARMUP_S, ROUNDS = (1.0, 0.5, 1) if QUICK else (1.5, 0.4, 3)
SERVER_CPUS, LOADGEN_CPUS = "0", "1"
TWO_CPUS, TWO_LOADGEN_CPUS = "0,1", ("2" if (os.cpu_count() or 1) > 2 else "0,1")
LOAD_FRACTIONS = (0.5, 0.8)
LOAD_SAME = 0.8  # the same-rate comparison: this share of the best peer's capacity


def _peers() -> list[str]:
    asked = os.environ.get("DISTML_BENCH_SERVE_PEERS")
    return [p for p in PEER_NAMES if asked is None or p in asked.split(",")]


def _groups() -> dict[str, dict]:
    """Per group: the model, the servers, their cores, the load generator's, each server's
    levels (closed: ``json1_c8``; open: ``open80``, a share of its ``json1_c32``)."""
    peers = _peers()
    closed = ["json1_c1", "json1_c8", "json1_c32", "json64_c32"]
    plans = {name: [*closed, "open50", "open80"] for name in ["distml_batched", *peers]}
    plans["distml_unbatched"] = closed
    return {
        "digits": {"model": "digits", "cpus": SERVER_CPUS, "loadgen": LOADGEN_CPUS,
                   "plans": plans},
        "wide": {"model": "wide", "cpus": SERVER_CPUS, "loadgen": LOADGEN_CPUS,
                 "plans": {n: ["json1_c1", "json1_c32"]
                           for n in ["distml_batched", "distml_unbatched", *peers]}},
        **{f"two_processes{suffix}": {
            "model": model, "cpus": TWO_CPUS, "loadgen": TWO_LOADGEN_CPUS,
            "plans": {n: ["json1_c32"] for n in ["distml_replicas2", "distml_batched"] + (
                ["plain_fastapi_tuned_workers2"] if "plain_fastapi_tuned" in peers else [])}}
           for suffix, model in (("", "digits"), ("_wide", "wide"))},
    }


def _payloads(rows: np.ndarray) -> dict[str, list[tuple[bytes, str]]]:
    """Request bodies by payload kind, cycling over the digits rows."""
    out = {}
    for n in (1, 64):
        chunks = [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)][:200]
        out[f"json{n}"] = [(json.dumps({"inputs": [{
            "name": "input", "datatype": "FP32", "shape": list(c.shape),
            "data": c.tolist()}]}).encode(), JSON_HEADERS) for c in chunks]
    return out


def _measure(port: int, level: str, payloads: dict, done: dict[str, dict], seed: int) -> dict:
    if level.startswith("open"):
        rate = int(level[4:]) / 100 * done["json1_c32"]["throughput_rps"]
        return run_open(port, PATH, payloads["json1"], rate, seconds=SECONDS,
                        warmup_s=WARMUP_S, seed=seed)
    payload, c = level.split("_c")
    return run_level(port, PATH, payloads[payload], int(c), seconds=SECONDS,
                     warmup_s=WARMUP_S)


def _turn(g: str, group: dict, name: str, server: tuple, payloads: dict, r: int,
          folder: Path) -> dict[str, dict]:
    """One server's levels in one round: started (pinned) for its turn and stopped after, so
    that no idle server (Ray's cluster keeps its processes busy) takes from the one measured."""
    cmd, port = server
    proc = start(cmd, group["cpus"], port, payloads["json1"][0][0], folder)
    done: dict[str, dict] = {}
    try:
        for level in group["plans"][name]:
            server0, client0 = cpu_seconds(proc), _own_cpu_seconds()
            done[level] = _measure(port, level, payloads, done, seed=r)
            served = done[level]["throughput_rps"] * (SECONDS + WARMUP_S)  # with the warm-up
            done[level]["cpu_us_per_request"] = {
                side: round(1e6 * used / max(served, 1), 1)
                for side, used in (("server", cpu_seconds(proc) - server0),
                                   ("client", _own_cpu_seconds() - client0))}
            print(f"[{r + 1}/{ROUNDS}] {g} {name} {level} {done[level]['throughput_rps']:.0f} "
                  f"req/s, p99 {done[level]['p99_ms']:.1f} ms", flush=True)
    finally:
        stop(proc)
    return done


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rounds(groups: dict, servers: dict, payloads: dict, tmp: Path
            ) -> tuple[dict, dict, list[dict]]:
    """runs[group][server][level]: one run per round (see the module's docstring), the
    servers that failed (each is not tried again), and each round's same-rate comparison."""
    runs: dict = {g: {s: {} for s in servers[g]} for g in groups}
    failed: dict[str, str] = {}
    same_rate: list[dict] = []
    for r in range(ROUNDS):
        for g, group in groups.items():
            os.sched_setaffinity(0, {int(c) for c in group["loadgen"].split(",")})
            names = list(servers[g])
            this_round: dict[str, dict] = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                if f"{g}/{name}" in failed:
                    continue
                try:
                    done = _turn(g, group, name, servers[g][name], payloads, r,
                                 tmp / "servers" / g)
                except Exception as e:  # noqa: BLE001 - reported; the others still run
                    failed[f"{g}/{name}"] = f"{type(e).__name__}: {str(e)[-500:]}"
                    print(g, name, "failed:", e, flush=True)
                    continue
                this_round[name] = done
                for level, run in done.items():
                    runs[g][name].setdefault(level, []).append(run)
            if g == "digits":
                same_rate += _same_rate(group, servers[g], this_round, payloads, r,
                                        tmp / "servers" / g)
    return {g: {s: v for s, v in by.items() if v} for g, by in runs.items()}, failed, same_rate


def _same_rate(group: dict, servers: dict, done: dict[str, dict], payloads: dict, r: int,
               folder: Path) -> list[dict]:
    """distml and this round's best peer at C = 32, both open loop at one absolute rate (80%
    of that peer's capacity): at 80% of each one's own capacity a server five times faster
    is offered five times the rate, and the latencies compare different loads (and the load
    generator's own lag grows with the rate)."""
    peers = {n: d["json1_c32"]["throughput_rps"] for n, d in done.items()
             if n in PEER_NAMES and "json1_c32" in d}
    if "distml_batched" not in done or not peers:
        return []
    best = max(peers, key=peers.__getitem__)
    out = {"round": r, "peer": best, "rate_rps": round(LOAD_SAME * peers[best], 1)}
    for side, name in (("ours", "distml_batched"), ("theirs", best)):
        cmd, port = servers[name]
        proc = start(cmd, group["cpus"], port, payloads["json1"][0][0], folder)
        try:
            out[side] = run_open(port, PATH, payloads["json1"], out["rate_rps"],
                                 seconds=SECONDS, warmup_s=WARMUP_S, seed=r)
        finally:
            stop(proc)
        print(f"[{r + 1}/{ROUNDS}] digits {name} open at {out['rate_rps']:.0f} req/s (80% of "
              f"{best}'s capacity): p99 {out[side]['p99_ms']:.1f} ms", flush=True)
    return [out]


def main() -> dict:
    from sklearn.datasets import load_digits

    rows = load_digits().data.astype(np.float32)
    payloads = _payloads(rows)
    groups = _groups()
    with tempfile.TemporaryDirectory(prefix="distml-bench-") as tmp:
        artifacts = {m: train(Path(tmp) / "models" / m, m) for m in ("digits", "wide")}
        raw_ms = {m: raw_forward_ms(a, rows, {int(SERVER_CPUS)}) for m, a in artifacts.items()}
        servers = {}
        for g, group in groups.items():
            (Path(tmp) / "servers" / g).mkdir(parents=True)
            servers[g] = commands(artifacts[group["model"]], Path(tmp) / "servers" / g,
                                  list(group["plans"]))
        runs, failed, same_rate = _rounds(groups, servers, payloads, Path(tmp))
        wrk = None
        if "distml_batched" in servers["digits"]:
            cmd, port = servers["digits"]["distml_batched"]
            proc = start(cmd, SERVER_CPUS, port, payloads["json1"][0][0], Path(tmp))
            try:
                os.sched_setaffinity(0, {int(LOADGEN_CPUS)})
                wrk = wrk_check(port, payloads["json1"][0][0], SECONDS, LOADGEN_CPUS)
            finally:
                stop(proc)
    return _summarize(runs, raw_ms, failed, wrk, same_rate)


def _per_round(a: list[dict], b: list[dict], key: str = "throughput_rps") -> dict:
    """Median and min-max of the per-round ratios a / b."""
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=True) if y[key]]
    return {"median": round(statistics.median(ratios), 3),
            "min_max": [round(min(ratios), 3), round(max(ratios), 3)]}


def _vs_best_peer(runs: dict, level: str, key: str = "throughput_rps",
                  best_at: str | None = None) -> dict | None:
    """distml's per-round ratio to the best peer's (highest median throughput at
    ``best_at``, default ``level``)."""
    best_at = best_at or level
    peers = {p: r for p, r in runs.items() if p in PEER_NAMES and best_at in r}
    if not peers or level not in runs.get("distml_batched", {}):
        return None
    best = max(peers, key=lambda p: statistics.median(x["throughput_rps"]
                                                      for x in peers[p][best_at]))
    ratio = _per_round(runs["distml_batched"][level], peers[best][level], key)
    p99 = [round(statistics.median(r["p99_ms"] for r in side[level]), 2)
           for side in (runs["distml_batched"], peers[best])]
    return {**ratio, "best_peer": best, "p99_ms_ours_peer": p99}


def _replicas(runs: dict) -> dict:
    """2 replicas (cores 0-1) against 1 (core 0), against 1 on the same cores 0-1, and
    against 2 processes of tuned FastAPI, per round, on each model."""
    out = {}
    for suffix, group, model in (("", "two_processes", "digits"),
                                 ("_compute_bound", "two_processes_wide", "wide")):
        two, one = runs[group], runs[model]
        both = "distml_replicas2" in two and "distml_batched" in one
        out[f"replicas_2_speedup{suffix}"] = (_per_round(
            two["distml_replicas2"]["json1_c32"], one["distml_batched"]["json1_c32"])
            if both else None)
        # the same cores for both (and the load generator): what the second replica adds
        out[f"replicas_2_vs_1_same_cores{suffix}"] = (_per_round(
            two["distml_replicas2"]["json1_c32"], two["distml_batched"]["json1_c32"])
            if {"distml_replicas2", "distml_batched"} <= set(two) else None)
        out[f"replicas_2_vs_peer_2_processes{suffix}"] = (_per_round(
            two["distml_replicas2"]["json1_c32"], two["plain_fastapi_tuned_workers2"]["json1_c32"])
            if {"distml_replicas2", "plain_fastapi_tuned_workers2"} <= set(two) else None)
    return out


def _same_rate_ratio(same_rate: list[dict]) -> dict | None:
    """distml's p99 over the best peer's, both at the same rate, per round."""
    if not same_rate:
        return None
    ratios = [s["ours"]["p99_ms"] / s["theirs"]["p99_ms"] for s in same_rate]
    return {"median": round(statistics.median(ratios), 3),
            "min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "best_peer": statistics.mode(s["peer"] for s in same_rate),
            "rate_rps": [s["rate_rps"] for s in same_rate],
            "p99_ms_ours_peer": [round(statistics.median(s[k]["p99_ms"] for s in same_rate), 2)
                                 for k in ("ours", "theirs")],
            **{f"{key}_ours_peer": [round(statistics.median(s[k][key] for s in same_rate), 3)
                                    for k in ("ours", "theirs")]
               for key in ("client_lag_p99_ms", "p99_less_client_lag_ms")}}


def _summarize(runs: dict, raw_ms: dict, failed: dict, wrk: dict | str | None,
               same_rate: list[dict]) -> dict:
    digits, wide = runs["digits"], runs["wide"]
    ratios = {
        "ratio_vs_best_peer_c32": _vs_best_peer(digits, "json1_c32"),
        "ratio_vs_best_peer_c1": _vs_best_peer(digits, "json1_c1"),
        "ratio_vs_best_peer_json64_c32": _vs_best_peer(digits, "json64_c32"),
        "ratio_vs_best_peer_c32_compute_bound": _vs_best_peer(wide, "json1_c32"),
        # p99 at 80% of each one's own capacity; the best peer: the best at C = 32
        "p99_at_80pct_load_vs_best_peer": _vs_best_peer(digits, "open80", "p99_ms",
                                                        best_at="json1_c32"),
        "p99_at_same_rate_vs_best_peer": _same_rate_ratio(same_rate),
        "batching_speedup_c32_compute_bound": (
            _per_round(wide["distml_batched"]["json1_c32"], wide["distml_unbatched"]["json1_c32"])
            if {"distml_batched", "distml_unbatched"} <= set(wide) else None),
        **_replicas(runs),
    }
    c1 = digits.get("distml_batched", {}).get("json1_c1")
    overhead = (round(statistics.median(r["p50_ms"] for r in c1) - raw_ms["digits"], 3)
                if c1 else None)
    result = {
        "models": {"digits": "digits mlp-wide (64-256-256-10, standardize)",
                   "wide": "wide MLP (64-3072-3072-3072-10, standardize)"},
        "seconds_per_level": SECONDS, "warmup_s": WARMUP_S, "rounds": ROUNDS, "quick": QUICK,
        "cpu_count": os.cpu_count(),
        "placement": {"server": SERVER_CPUS, "loadgen": LOADGEN_CPUS,
                      "two_processes_server": TWO_CPUS,
                      "two_processes_loadgen": TWO_LOADGEN_CPUS,
                      "two_processes_loadgen_shares_server_cores": TWO_LOADGEN_CPUS == "0,1"},
        **{k: (v["median"] if v else None) for k, v in ratios.items()},
        "ratios": ratios,
        "raw_forward_ms": {m: round(v, 3) for m, v in raw_ms.items()},
        "overhead_vs_raw_forward_c1_ms": overhead,
        "wrk_check": wrk, "failed": failed, "same_rate": same_rate,
        "results": {g: {s: {lv: summarize(r) for lv, r in levels.items()}
                        for s, levels in servers.items()} for g, servers in runs.items()},
    }
    save("serve", result)
    return result


def _cell(r: dict | None) -> str:
    if not r or "throughput_rps" not in r:
        return "-"
    lo, hi = r["throughput_min_max"]
    return f"{r['throughput_rps']:,.0f} req/s ({lo:,.0f}-{hi:,.0f}), p99 {r['p99_ms']:.1f} ms"


def _ratio_cell(r: dict, key: str) -> str:
    v = r["ratios"].get(key)
    if not v:
        return "not measured"
    peer = f" vs {v['best_peer']}" if "best_peer" in v else ""
    if "p99_ms_ours_peer" in v:
        ours, theirs = v["p99_ms_ours_peer"]
        peer += f" (p99 {ours:.1f} ms against {theirs:.1f} ms)"
    lo, hi = v["min_max"]
    return f"{v['median']:.2f} ({lo:.2f}-{hi:.2f} over rounds){peer}"


TARGETS = {"ratio_vs_best_peer_c32": ">= 1.2, p99 no worse", "ratio_vs_best_peer_c1": ">= 1.0",
           "ratio_vs_best_peer_json64_c32": ">= 1.2",
           "batching_speedup_c32_compute_bound": ">= 4", "replicas_2_speedup": ">= 1.7",
           "replicas_2_speedup_compute_bound": "reported",
           "replicas_2_vs_peer_2_processes": "reported",
           "replicas_2_vs_1_same_cores": "reported",
           "p99_at_80pct_load_vs_best_peer": "<= 1",
           "p99_at_same_rate_vs_best_peer": "<= 1"}


def table_rows(r: dict) -> list[tuple[str, str, str, str]]:
    rows = [("serve", key, _ratio_cell(r, key), target) for key, target in TARGETS.items()]
    over = r.get("overhead_vs_raw_forward_c1_ms")
    rows.append(("serve, c=1", "overhead_vs_raw_forward_c1_ms",
                 "-" if over is None else f"{over:.2f} ms (forward alone "
                 f"{r['raw_forward_ms']['digits']:.2f} ms)", "<= 0.3 ms"))
    for g, levels in (("digits", ("json1_c1", "json1_c8", "json1_c32", "json64_c32", "open50",
                                  "open80")), ("wide", ("json1_c1", "json1_c32")),
                      ("two_processes", ("json1_c32",)), ("two_processes_wide", ("json1_c32",))):
        for level in levels:
            cells = "; ".join(f"{s} {_cell(v.get(level))}"
                              for s, v in r["results"][g].items() if level in v)
            rows.append((f"serve, {g}, {level}", "throughput (min-max), p99", cells,
                         "reported"))
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
