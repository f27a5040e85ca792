"""Run benchmarks: ``python -m bench [ingest] [loader] [loader_parts] [train] [scaling] [serve]
[drift] [serve_monitor] [param_server] [distill]``; writes
bench/results/*.json and the README's benchmark table."""

from __future__ import annotations

import json
import sys

from bench import (
    distill,
    drift,
    ingest,
    loader,
    loader_parts,
    param_server,
    scaling,
    serve,
    serve_monitor,
    train,
)
from bench.common import RESULTS, update_readme

BENCHMARKS = {"ingest": ingest, "loader": loader, "loader_parts": loader_parts,
              "train": train, "scaling": scaling, "serve": serve,
              "serve_monitor": serve_monitor,
              "drift": drift, "param_server": param_server, "distill": distill}


def main(names: list[str]) -> None:
    for name in names or list(BENCHMARKS):
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
        print(f"== {name}", flush=True)
        print(json.dumps(BENCHMARKS[name].main(), indent=2), flush=True)
    rows = []  # the table shows every saved result, not only this run's
    for name, module in BENCHMARKS.items():
        path = RESULTS / f"{name}.json"
        if path.exists():
            rows += module.table_rows(json.loads(path.read_text()))
    update_readme(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
