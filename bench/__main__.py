"""Run benchmarks: ``python -m bench [ingest] [loader] [loader_parts] [train] [scaling] [serve]
[drift] [serve_monitor] [param_server] [distill] [search] [plan] [elastic]``; writes
bench/results/*.json and the README's benchmark table. ``DISTML_BENCH_QUICK=1``: each in
a short version that saves nothing (a check that it runs)."""

from __future__ import annotations

import json
import sys

from bench import (
    distill,
    drift,
    elastic,
    ingest,
    loader,
    loader_parts,
    param_server,
    plan,
    scaling,
    search,
    serve,
    serve_monitor,
    train,
)
from bench.common import load_results, update_readme

BENCHMARKS = {"ingest": ingest, "loader": loader, "loader_parts": loader_parts,
              "train": train, "scaling": scaling, "serve": serve,
              "serve_monitor": serve_monitor,
              "drift": drift, "param_server": param_server, "distill": distill,
              "search": search, "plan": plan, "elastic": elastic}


def main(names: list[str]) -> None:
    for name in names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
        print(f"== {name}", flush=True)
        print(json.dumps(BENCHMARKS[name].main(), indent=2), flush=True)
    update_readme(table_rows(load_results()))


def table_rows(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """The README table: every saved result, not only this run's."""
    return [row for name, module in BENCHMARKS.items() if name in results
            for row in module.table_rows(results[name])]

if __name__ == "__main__":
    main(sys.argv[1:])
